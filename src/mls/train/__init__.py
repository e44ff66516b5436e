"""Pretraining with Lightning: ``pretrain()`` is the ``mls pretrain`` command; ``PretrainOptions`` types its keywords."""
from mls.train.fit import pretrain
from mls.train.options import PretrainOptions

__all__ = ["pretrain", "PretrainOptions"]
