"""Real images: loading any file as 8-bit RGB, image folders and COCO folders as multi-label sources."""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg, read_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class UnreadableImage(OSError):
    """An image file that exists in the data set but cannot be decoded (corrupt, truncated, not an image)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):
        return type(self), (self.path, self.reason)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB; integer and float images are scaled to 0..255 rather than clipped.

    16-bit images (``I;16*``, and ``I`` whose values fit 0..65535, as PIL opens 16-bit PNGs) are
    divided by 257 so that 65535 -> 255; other ``I`` and ``F`` images are stretched from their
    minimum to their maximum. Transparency is dropped, as torchvision's loader does.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        values = np.asarray(img, dtype=np.float64)
        if img.mode != "F" and values.min() >= 0 and values.max() <= 65535:
            scaled = values / 257.0
        else:
            low, high = values.min(), values.max()
            scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        return Image.fromarray(np.round(scaled).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def decode_rgb(file, name: str | os.PathLike) -> Image.Image:
    """An image (a path or a binary file object) as 8-bit RGB whatever its mode; ``UnreadableImage`` (naming
    it ``name``) if it cannot be decoded."""
    try:
        with Image.open(file) as img:
            img.load()  # decode now, so a truncated file fails here and not later in a transform
            return _to_rgb(img)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise UnreadableImage(name, str(error) or type(error).__name__) from error


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file as 8-bit RGB whatever its mode; ``UnreadableImage`` if it cannot be decoded."""
    return decode_rgb(path, path)


def _jpeg_pixels(data: torch.Tensor) -> torch.Tensor | None:
    """An 8-bit RGB or grey JPEG's bytes decoded by ``torchvision.io.decode_jpeg`` (libjpeg-turbo, as PIL's,
    without the PIL image in between) as uint8 (3, H, W); ``None`` for anything else (CMYK, 12-bit,
    truncated, corrupt, not a JPEG), which PIL decides."""
    if not (data.numel() > 2 and data[0] == 0xFF and data[1] == 0xD8):  # the JPEG start-of-image marker
        return None
    try:
        pixels = decode_jpeg(data, mode=ImageReadMode.UNCHANGED)
    except RuntimeError:
        return None
    if pixels.shape[0] == 3:
        return pixels
    return pixels.expand(3, -1, -1).contiguous() if pixels.shape[0] == 1 else None


def _as_tensor(rgb: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


def decode_pixels(data: torch.Tensor, name: str | os.PathLike) -> torch.Tensor:
    """An encoded image (a file's bytes as a 1-D uint8 tensor) as a uint8 (3, H, W) tensor: the same pixels
    as ``decode_rgb``, fast for JPEGs (``_jpeg_pixels``); ``UnreadableImage`` (naming it ``name``) for a bad one."""
    pixels = _jpeg_pixels(data)
    return pixels if pixels is not None else _as_tensor(decode_rgb(io.BytesIO(data.numpy().tobytes()), name))


def load_pixels(path: str | os.PathLike) -> torch.Tensor:
    """An image file as a uint8 (3, H, W) tensor: ``decode_pixels`` of its bytes; every file the JPEG fast
    path refuses goes through ``load_rgb``, which raises ``UnreadableImage`` for a bad file."""
    try:
        pixels = _jpeg_pixels(read_file(str(path)))
    except RuntimeError:  # unreadable here: PIL decides
        pixels = None
    return pixels if pixels is not None else _as_tensor(load_rgb(path))


def image_set_fingerprint(names: list[str]) -> str:
    """What identifies a set of images wherever it lies (a folder or shards): their number and a short hash
    of their sorted relative names (not of their contents, so that it costs no reading)."""
    digest = hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:12]
    return f"image folder: {len(names)} images, names {digest}"


def _scan_images(root: str) -> list[str]:
    """Paths (relative to ``root``, with ``/``) of every image file below ``root``, sorted.

    ``os.scandir`` reads names and types from the directory listing without touching the files,
    so a folder of 100k+ images is listed in well under a second.
    """
    found = []
    stack = [root]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=True):
                    stack.append(entry.path)
                elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    found.append(os.path.relpath(entry.path, root).replace(os.sep, "/"))
    return sorted(found)


def read_coco_labels(annotations: str) -> tuple[list[str], list[list[int]], tuple[str, ...]]:
    """File names, 0-based class indices per image and class names from a COCO ``instances_*.json``.

    Category ids (1..90 with gaps in COCO) become contiguous indices in increasing id order.
    Images without annotations keep an empty label list.
    """
    try:
        with open(annotations) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"COCO annotation file not found: {annotations}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{annotations} is not valid JSON: {error}") from None
    missing = [key for key in ("images", "annotations", "categories") if key not in data]
    if missing:
        raise ValueError(f"{annotations} is not a COCO instances file: no {', '.join(missing)} key")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    index_of = {c["id"]: k for k, c in enumerate(categories)}
    labels_of: dict[int, set[int]] = {image["id"]: set() for image in data["images"]}
    for annotation in data["annotations"]:
        labels_of[annotation["image_id"]].add(index_of[annotation["category_id"]])
    files = [image["file_name"] for image in data["images"]]
    labels = [sorted(labels_of[image["id"]]) for image in data["images"]]
    return files, labels, tuple(c["name"] for c in categories)


class ImageFolderSource:
    """The images under a folder (recursively, sorted), optionally labelled by a COCO annotation file.

    Same interface as ``SyntheticScenes``: ``image(i)``, ``labels(i)``, ``classes``, ``multi_hot()``.
    Without annotations the labels, classes and multi-hot matrix are ``None``.
    """

    def __init__(self, root: str | os.PathLike, annotations: str | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        on_disk = _scan_images(str(self.root))
        self.classes: tuple[str, ...] | None = None
        self._labels: list[list[int]] | None = None
        if annotations is None:
            self.files = on_disk
        else:
            self.files, self._labels, self.classes = read_coco_labels(annotations)
            absent = sorted(set(self.files) - set(on_disk))
            if absent:
                raise FileNotFoundError(
                    f"{len(absent)} of the {len(self.files)} images listed in {annotations} are not image "
                    f"files under {self.root}, e.g. {', '.join(absent[:3])}")
        if not self.files:
            raise ValueError(
                f"no image files in {self.root} (looked recursively for {', '.join(IMAGE_EXTENSIONS)}, "
                "any letter case)")

    def __len__(self) -> int:
        return len(self.files)

    def fingerprint(self) -> str:
        """``image_set_fingerprint`` of the files: a shard set made from this folder has the same."""
        return image_set_fingerprint(self.files)

    def names(self) -> list[str]:
        """The images' paths relative to the folder, with ``/``, in data-set order."""
        return list(self.files)

    def path(self, i: int) -> Path:
        """The file of image ``i``."""
        return self.root / self.files[i]

    def image(self, i: int) -> Image.Image:
        """Image ``i`` as 8-bit RGB; ``UnreadableImage`` if the file cannot be decoded."""
        return load_rgb(self.path(i))

    def pixels(self, i: int) -> torch.Tensor:
        """Image ``i`` as a uint8 (3, H, W) tensor (``load_pixels``); ``UnreadableImage`` if it cannot be decoded."""
        return load_pixels(self.path(i))

    def labels(self, i: int) -> list[int] | None:
        """0-based class indices of image ``i``, or ``None`` without annotations."""
        return None if self._labels is None else list(self._labels[i])

    def multi_hot(self) -> torch.Tensor | None:
        """(len, num_classes) 0/1 float tensor of the labels, or ``None`` without annotations."""
        return None if self._labels is None else labels_to_multi_hot(self._labels, len(self.classes))


def labels_to_multi_hot(labels: list[list[int]], num_classes: int) -> torch.Tensor:
    """(len(labels), num_classes) 0/1 float tensor with a 1 for each class index of each image."""
    out = torch.zeros(len(labels), num_classes)
    for row, image_labels in enumerate(labels):
        out[row, list(image_labels)] = 1.0
    return out
