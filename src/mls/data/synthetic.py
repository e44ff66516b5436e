"""Built-in scene images: a few large coloured shapes on varied backgrounds, with labels, boxes and masks.

Scene ``i`` depends only on ``(seed, i)``, so any worker or rank can draw it on the fly. The same
scenes can be written to disk as a COCO or a VOC2007 data set, so that every evaluation and transfer
protocol runs end to end without downloading anything.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from mls.data.images import labels_to_multi_hot

# Each class is one shape in one colour; the last two are striped. Colours are saturated and the
# backgrounds muted, so that a 64 px crop keeps every object recognisable.
CLASSES: tuple[str, ...] = (
    "red_circle",
    "green_square",
    "blue_triangle",
    "yellow_cross",
    "magenta_ring",
    "cyan_crescent",
    "orange_striped_square",
    "white_striped_circle",
)
_COLOURS = np.array(
    [[220, 30, 30], [30, 190, 40], [40, 60, 230], [240, 220, 30],
     [220, 40, 220], [30, 210, 220], [250, 140, 20], [245, 245, 245]],
    dtype=np.float32,
)
_SHAPES = ("circle", "square", "triangle", "cross", "ring", "crescent", "square", "circle")
_STRIPED = (False, False, False, False, False, False, True, True)

RADIUS = (0.15, 0.3)  # object radius, as a fraction of the image side
MIN_VISIBLE = 0.4  # an object keeps at least this share of its area when later objects overlap it
DIFFICULT_AREA = 0.035  # VOC: an object whose visible area is below this share of the image is difficult
_PLACEMENT_TRIES = 30


@dataclass
class Scene:
    """One image with its objects: class indices, visible boxes (xyxy pixels) and visible masks."""

    image: Image.Image
    labels: list[int]
    boxes: np.ndarray  # float32 (n, 4): x0, y0, x1, y1 with x1, y1 one past the last mask pixel
    masks: np.ndarray  # bool (n, H, W): the pixels of each object left visible by the objects above it


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) of a square image, shared by every scene of that size."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return yy, xx


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test of a shape in its own coordinates, radius 1 and centred at 0."""
    r2 = u * u + v * v
    if shape == "circle":
        return r2 <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "triangle":  # equilateral, circumradius 1: three half-planes at distance 0.5
        c, s = np.float32(np.sqrt(3) / 2), np.float32(0.5)
        return (v <= 0.5) & (-c * u - s * v <= 0.5) & (c * u - s * v <= 0.5)
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.3)
    if shape == "crescent":
        return (r2 <= 1.0) & ((u - 0.55) ** 2 + v * v > 0.6)
    raise ValueError(f"unknown shape {shape!r}")


def _local_coords(size: int, cx: float, cy: float, radius: float,
                  angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Every pixel in the rotated, radius-scaled frame of one object."""
    yy, xx = _grid(size)
    dx, dy = xx - cx, yy - cy
    cos, sin = np.float32(np.cos(angle) / radius), np.float32(np.sin(angle) / radius)
    return dx * cos + dy * sin, -dx * sin + dy * cos


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted uniform colour, linear gradient or blotchy noise (H, W, 3 float)."""
    def muted() -> np.ndarray:
        return rng.uniform(40, 150) + rng.uniform(-25, 25, 3)

    kind = rng.integers(3)
    if kind == 0:
        return np.broadcast_to(muted(), (size, size, 3)).astype(np.float32)
    if kind == 1:
        yy, xx = _grid(size)
        angle = rng.uniform(0, 2 * np.pi)
        t = ((xx * np.cos(angle) + yy * np.sin(angle)) / size + 1.0) / 2.0
        a, b = muted(), muted()
        return (a + t[..., None] * (b - a)).astype(np.float32)
    cells = int(rng.integers(2, 9))
    coarse = rng.normal(0.0, 20.0, (cells, cells, 3))
    reps = -(-size // cells)
    blotches = np.repeat(np.repeat(coarse, reps, 0), reps, 1)[:size, :size]
    return (muted() + blotches + rng.normal(0.0, 6.0, (size, size, 3))).astype(np.float32)


class SyntheticScenes(Dataset):
    """Scenes of 1-3 distinct-class objects, drawn on the fly from ``(seed, index)``.

    ``scenes[i]`` gives the PIL image and its multi-hot label vector, as a multi-label data set does.
    """

    def __init__(self, num_images: int = 2000, image_size: int = 64, seed: int = 0,
                 min_objects: int = 1, max_objects: int = 3):
        if num_images < 1:
            raise ValueError(f"num_images must be at least 1, got {num_images}")
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        if not 1 <= min_objects <= max_objects <= len(CLASSES):
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= {len(CLASSES)} (the number of classes), "
                f"got min_objects={min_objects}, max_objects={max_objects}")
        self.num_images = num_images
        self.image_size = image_size
        self.seed = seed
        self.min_objects = min_objects
        self.max_objects = max_objects
        self.classes = CLASSES
        self._multi_hot: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.num_images

    def fingerprint(self) -> str:
        """What identifies these scenes: they are drawn from (count, size, seed) alone."""
        return f"built-in scenes: {self.num_images} of {self.image_size} px, seed {self.seed}"

    def _check_index(self, i: int) -> int:
        if not -self.num_images <= i < self.num_images:
            raise IndexError(f"scene index {i} out of range for {self.num_images} images")
        return i % self.num_images

    def _layout(self, rng: np.random.Generator) -> tuple[list[int], list[np.ndarray], list[dict]]:
        """Classes, full masks and drawing parameters of the objects, bottom to top.

        Each new object is placed so that every object below it keeps at least ``MIN_VISIBLE`` of
        its area; an object that finds no such place in ``_PLACEMENT_TRIES`` tries is left out.
        """
        size = self.image_size
        count = int(rng.integers(self.min_objects, self.max_objects + 1))
        classes = rng.choice(len(CLASSES), size=count, replace=False)
        labels, masks, visible, params = [], [], [], []
        for cls in classes:
            for _ in range(_PLACEMENT_TRIES):
                radius = rng.uniform(*RADIUS) * size
                cx, cy = rng.uniform(0.7 * radius, size - 0.7 * radius, 2)
                angle = rng.uniform(0, 2 * np.pi)
                u, v = _local_coords(size, cx, cy, radius, angle)
                full = _shape_mask(_SHAPES[cls], u, v)
                if not full.any():
                    continue
                kept = [seen & ~full for seen in visible]
                if all(k.sum() >= MIN_VISIBLE * m.sum() for k, m in zip(kept, masks)):
                    break
            else:
                continue
            labels.append(int(cls))
            masks.append(full)
            visible = kept + [full]
            params.append(dict(u=u, colour=_COLOURS[cls] + rng.uniform(-15, 15, 3)))
        return labels, masks, params

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self._check_index(i)])

    def scene(self, i: int) -> Scene:
        """The image of scene ``i`` with its labels, visible boxes and visible masks."""
        rng = self._rng(i)
        labels, full_masks, params = self._layout(rng)
        pixels = _background(rng, self.image_size)
        for cls, full, p in zip(labels, full_masks, params):
            pixels[full] = p["colour"]
            if _STRIPED[cls]:
                stripes = full & (np.floor(p["u"] * 2.5) % 2 == 0)
                pixels[stripes] = p["colour"] * 0.25
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
        masks = _visible(full_masks, self.image_size)
        return Scene(image=image, labels=labels, boxes=_boxes(masks), masks=masks)

    def image(self, i: int) -> Image.Image:
        """The RGB image of scene ``i``."""
        return self.scene(i).image

    def labels(self, i: int) -> list[int]:
        """Class indices of the objects in scene ``i`` (bottom to top), without drawing the image."""
        return self._layout(self._rng(i))[0]

    def __getitem__(self, i: int) -> tuple[Image.Image, torch.Tensor]:
        scene = self.scene(i)
        return scene.image, labels_to_multi_hot([scene.labels], len(CLASSES))[0]

    def multi_hot(self) -> torch.Tensor:
        """(num_images, len(CLASSES)) 0/1 float tensor of every scene's labels, computed once."""
        if self._multi_hot is None:
            labels = [self.labels(i) for i in range(self.num_images)]
            self._multi_hot = labels_to_multi_hot(labels, len(CLASSES))
        return self._multi_hot.clone()


def _visible(full_masks: list[np.ndarray], size: int) -> np.ndarray:
    """Each object's mask minus the objects drawn above it."""
    masks = np.zeros((len(full_masks), size, size), dtype=bool)
    covered = np.zeros((size, size), dtype=bool)
    for k in range(len(full_masks) - 1, -1, -1):
        masks[k] = full_masks[k] & ~covered
        covered |= full_masks[k]
    return masks


def _boxes(masks: np.ndarray) -> np.ndarray:
    """Tight xyxy pixel boxes of masks, with x1, y1 one past the last pixel (so w = x1 - x0)."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for k, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        boxes[k] = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return boxes


# ---------------------------------------------------------------------------------------------
# Writers


def write_coco(root: str | Path, num_images: int = 200, image_size: int = 64, seed: int = 0,
               splits: Sequence[str] = ("train2017", "val2017")) -> dict[str, Path]:
    """Write ``num_images`` scenes per split as a COCO data set; returns each split's annotation file.

    Split ``k`` holds scenes ``k*num_images .. (k+1)*num_images - 1`` of one generator, so splits never
    share an image; image id = scene index + 1, file ``<root>/<split>/<id:012d>.png``.
    Masks are stored as compressed RLE.
    """
    root = Path(root)
    scenes = SyntheticScenes(num_images * len(splits), image_size, seed)
    categories = [{"id": c + 1, "name": name, "supercategory": "shape"} for c, name in enumerate(CLASSES)]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    written = {}
    annotation_id = 1
    for k, split in enumerate(splits):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for index in range(k * num_images, (k + 1) * num_images):
            scene = scenes.scene(index)
            image_id = index + 1
            file_name = f"{image_id:012d}.png"
            scene.image.save(root / split / file_name)
            images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
            for label, box, mask in zip(scene.labels, scene.boxes, scene.masks):
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                x0, y0, x1, y1 = (float(b) for b in box)
                annotations.append({
                    "id": annotation_id, "image_id": image_id, "category_id": label + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(mask.sum()),
                    "iscrowd": 0, "segmentation": rle,
                })
                annotation_id += 1
        path = root / "annotations" / f"instances_{split}.json"
        path.write_text(json.dumps({
            "info": {"description": f"MLS synthetic scenes, seed {seed}"},
            "images": images, "annotations": annotations, "categories": categories,
        }))
        written[split] = path
    return written


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (256 RGB triples, flattened) used by its segmentation PNGs."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def _voc_xml(name: str, size: int, scene: Scene) -> ET.ElementTree:
    """VOC annotation of a scene: boxes in VOC's 1-based inclusive pixel coordinates."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2007"
    ET.SubElement(root, "filename").text = f"{name}.jpg"
    size_el = ET.SubElement(root, "size")
    for tag, value in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(size_el, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "1"
    for label, box, mask in zip(scene.labels, scene.boxes, scene.masks):
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = CLASSES[label]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = str(int(is_difficult(mask)))
        bndbox = ET.SubElement(obj, "bndbox")
        x0, y0, x1, y1 = (int(b) for b in box)
        for tag, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(bndbox, tag).text = str(value)
    ET.indent(root)
    return ET.ElementTree(root)


def is_difficult(mask: np.ndarray) -> bool:
    """VOC's ``difficult`` flag for a synthetic object: visible area below ``DIFFICULT_AREA`` of the image."""
    return bool(mask.sum() < DIFFICULT_AREA * mask.size)


def write_voc(root: str | Path, num_images: int = 200, image_size: int = 64, seed: int = 0,
              test_fraction: float = 0.5) -> Path:
    """Write ``num_images`` scenes as a VOC2007 tree (detection, classification and segmentation).

    The first ``num_images - round(num_images * test_fraction)`` scenes form ``trainval``, the rest
    ``test``. Objects are ``difficult`` when their visible area is below ``DIFFICULT_AREA`` of the
    image (see ``is_difficult``); in ``<cls>_<set>.txt`` an image whose objects of that class are
    all difficult is marked 0, as in VOC. Returns ``root/VOCdevkit/VOC2007``.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    voc = Path(root) / "VOCdevkit" / "VOC2007"
    dirs = {name: voc / name for name in
            ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Main", "ImageSets/Segmentation")}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    scenes = SyntheticScenes(num_images, image_size, seed)
    num_trainval = num_images - round(num_images * test_fraction)
    palette = voc_palette()
    sets: dict[str, list[str]] = {"trainval": [], "test": []}
    presence: dict[str, list[np.ndarray]] = {"trainval": [], "test": []}  # per image: 1, 0 or -1 per class
    for index in range(num_images):
        name = f"{index + 1:06d}"
        split = "trainval" if index < num_trainval else "test"
        scene = scenes.scene(index)
        scene.image.save(dirs["JPEGImages"] / f"{name}.jpg", quality=95)
        _voc_xml(name, image_size, scene).write(dirs["Annotations"] / f"{name}.xml")
        segmentation = np.zeros((image_size, image_size), dtype=np.uint8)
        flags = np.full(len(CLASSES), -1)
        for label, mask in zip(scene.labels, scene.masks):
            segmentation[mask] = label + 1
            flags[label] = 0 if is_difficult(mask) else 1
        png = Image.fromarray(segmentation, "P")
        png.putpalette(palette)
        png.save(dirs["SegmentationClass"] / f"{name}.png")
        sets[split].append(name)
        presence[split].append(flags)
    for split, names in sets.items():
        listing = "".join(f"{name}\n" for name in names)
        (dirs["ImageSets/Main"] / f"{split}.txt").write_text(listing)
        (dirs["ImageSets/Segmentation"] / f"{split}.txt").write_text(listing)
        for c, cls in enumerate(CLASSES):
            lines = "".join(f"{name} {flags[c]:2d}\n" for name, flags in zip(names, presence[split]))
            (dirs["ImageSets/Main"] / f"{cls}_{split}.txt").write_text(lines)
    return voc


def synth(out: str, num_images: int = 1000, image_size: int = 64, seed: int = 0,
          format: Literal["coco", "voc", "folder"] = "coco") -> None:
    """Write the built-in synthetic scene data set to disk.

    Args:
        out: Directory to write into (created if missing).
        num_images: Number of images; for ``coco`` this many per split (train2017 and val2017),
            for ``voc`` in total (half trainval, half test).
        image_size: Side of the square images in pixels.
        seed: Seed of the generator; the same seed writes the same images.
        format: ``coco`` (images + instances JSON), ``voc`` (VOC2007 tree) or ``folder`` (PNG files only).
    """
    root = Path(out)
    if format == "coco":
        for split, path in write_coco(root, num_images, image_size, seed).items():
            print(f"{split}: {num_images} images in {root / split}, annotations in {path}")
    elif format == "voc":
        voc = write_voc(root, num_images, image_size, seed)
        print(f"VOC2007: {num_images} images in {voc} (ImageSets/Main/trainval.txt, test.txt)")
    elif format == "folder":
        root.mkdir(parents=True, exist_ok=True)
        scenes = SyntheticScenes(num_images, image_size, seed)
        for index in range(num_images):
            scenes.image(index).save(root / f"{index + 1:012d}.png")
        print(f"{num_images} images in {root}")
    else:
        raise ValueError(f"format must be one of coco, voc, folder, got {format!r}")
