"""Pretraining with Lightning: ``pretrain()`` is the ``mls pretrain`` command; ``PretrainOptions`` types its keywords."""
from mls.train.fit import pretrain
from mls.train.pretrain_options import PretrainOptions

__all__ = ["pretrain", "PretrainOptions"]
