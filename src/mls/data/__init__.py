"""Data: the built-in synthetic scenes, real image folders, and MoCo-v2 two-view augmentation."""
from mls.data.augment import MoCoV2View, TwoViewDataset, View, ViewConfig
from mls.data.images import ImageFolderSource, UnreadableImage, load_rgb
from mls.data.sources import open_source
from mls.data.synthetic import CLASSES, Scene, SyntheticScenes, write_coco, write_voc

__all__ = [
    "CLASSES", "ImageFolderSource", "MoCoV2View", "Scene", "SyntheticScenes", "TwoViewDataset",
    "UnreadableImage", "View", "ViewConfig", "load_rgb", "open_source", "write_coco", "write_voc",
]
