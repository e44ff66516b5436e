"""MLS: Multi-Label Self-supervised learning with scene images (Zhu, Fu, Wu, ICCV 2023).

The method itself — model, queues, pseudo-label selection and losses — needs only
torch and torchvision::

    from mls import MLS
    model = MLS(arch="resnet50", method="mls", topk=20, queue_size=65536)
    out = model(x1, x2, {"index": idx, "box": box2})
    out["loss"].backward()
"""
from mls.losses import bce, bce_pos, infonce, knn_softmax
from mls.model import MLS
from mls.queue import FeatureQueue
from mls.selection import select_topk

__version__ = "0.2.0"
__all__ = ["MLS", "FeatureQueue", "select_topk", "infonce", "bce", "bce_pos", "knn_softmax"]
