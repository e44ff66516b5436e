"""Where pretraining images come from: the built-in synthetic scenes, a folder of image files, or a shard set."""
from __future__ import annotations

from mls.data.images import ImageFolderSource
from mls.data.shards import ShardSource, is_shard_set
from mls.data.synthetic import SyntheticScenes


def open_source(data: str | None = None, *, annotations: str | None = None, num_images: int = 2000,
                image_size: int = 64, seed: int = 0) -> SyntheticScenes | ImageFolderSource | ShardSource:
    """``None`` or ``"synthetic"``: the built-in scenes; a URL or a folder made by ``mls shard``: that shard
    set; otherwise the image folder ``data``."""
    if data is None or data == "synthetic":
        return SyntheticScenes(num_images, image_size, seed)
    if is_shard_set(data):
        return ShardSource(data, annotations)
    return ImageFolderSource(data, annotations)
