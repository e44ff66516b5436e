"""MLS: Multi-Label Self-supervised learning with scene images (Zhu, Fu, Wu, ICCV 2023).

The method itself (``mls.method``: model, queues, pseudo-label selection and losses) needs only
torch and torchvision::

    from mls import MLS, MLSConfig
    model = MLS(MLSConfig())                 # the main paper's settings; or MLS(arch="resnet18", topk=5)
    out = model(x1, x2, {"index": idx, "box": box2})
    out["loss"].backward()
"""
from mls.method import MLS, FeatureQueue, MLSConfig, bce, bce_pos, infonce, knn_softmax, select_topk

__version__ = "0.9.2"
__all__ = ["MLS", "MLSConfig", "FeatureQueue", "select_topk", "infonce", "bce", "bce_pos", "knn_softmax"]
