"""The method: MoCo-v2 plus the queue ``Q_g`` whose top-k neighbours are pseudo-labels for an extra loss.

Everything MLS is lives here, and needs only torch, torchvision and the standard library (a test keeps it
so): its settings (``settings``), the model and its step (``model``), the queue (``queue``), the
pseudo-label selection (``selection``), the losses (``losses``), the backbones (``backbones``), gathering
across ranks (``distributed``) and the representation-health measures (``health``).
"""
from mls.method.losses import bce, bce_pos, infonce, knn_softmax
from mls.method.model import MLS
from mls.method.queue import FeatureQueue
from mls.method.selection import select_topk
from mls.method.settings import MLSConfig

__all__ = ["MLS", "MLSConfig", "FeatureQueue", "select_topk", "infonce", "bce", "bce_pos", "knn_softmax"]
