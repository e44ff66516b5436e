"""Pretraining with Lightning: ``pretrain()`` is the ``mls pretrain`` command."""
from mls.train.run import pretrain

__all__ = ["pretrain"]
