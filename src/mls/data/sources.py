"""Where pretraining images come from: the built-in synthetic scenes, or a folder of image files."""
from __future__ import annotations

from mls.data.images import ImageFolderSource
from mls.data.synthetic import SyntheticScenes


def open_source(data: str | None = None, *, annotations: str | None = None, num_images: int = 2000,
                image_size: int = 64, seed: int = 0) -> SyntheticScenes | ImageFolderSource:
    """``None`` or ``"synthetic"``: the built-in scenes; otherwise the image folder ``data``."""
    if data is None or data == "synthetic":
        return SyntheticScenes(num_images, image_size, seed)
    return ImageFolderSource(data, annotations)
