"""Checkpoints: reading and writing a pretraining checkpoint or a backbone's weights (``pretrained``), the
layouts earlier versions of mls wrote (``versions``), and exporting the query backbone (``export``)."""
