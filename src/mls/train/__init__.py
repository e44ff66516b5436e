"""Pretraining with Lightning: ``pretrain()`` is the ``mls pretrain`` command; ``PretrainOptions`` types its keywords."""
from mls.train.options import PretrainOptions
from mls.train.run import pretrain

__all__ = ["pretrain", "PretrainOptions"]
