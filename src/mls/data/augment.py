"""MoCo-v2 augmentation that also reports where each view was cropped, and the two-view data set."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as F

from mls.data.images import UnreadableImage
from mls.method.backbones import IMAGENET_MEAN, IMAGENET_STD
from mls.method.settings import setting


class View(NamedTuple):
    """One augmented view: the normalised image, its crop box in the source image, and whether it was flipped.

    ``box`` is ``(x0, y0, x1, y1)`` in source-image coordinates normalised to [0, 1], the same
    whether or not the view was mirrored, so it can be drawn on the source as it is; ``flipped``
    says that the view's left edge shows the box's right edge.
    """

    image: torch.Tensor
    box: torch.Tensor
    flipped: bool


def blur_kernel_size(size: int) -> int:
    """An odd Gaussian kernel of about 10% of the view size (SimCLR / MoCo-v2: 23 at 224 px)."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def blur_sigma_range(size: int) -> tuple[float, float]:
    """MoCo-v2's blur sigma range, (0.1, 2.0) px at 224 px, scaled with the view size as the kernel is.

    Kept at 2 px, a 64 px view would be blurred as much as a 224 px one with sigma 7, which smears
    the fine texture that tells objects apart.
    """
    return 0.1 * size / 224, 2.0 * size / 224


class MoCoV2View:
    """MoCo-v2's view (RandomResizedCrop, flip, colour jitter, grayscale, blur) with its crop box.

    The crop is sampled by torchvision's own ``RandomResizedCrop.get_params``; each ``*_p`` is the
    probability of that step, so 0 turns it off. ``hue`` is the jitter's largest hue shift as a share
    of the colour circle (MoCo-v2: 0.1, i.e. up to 36 degrees). The blur's kernel and sigma range scale
    with ``size`` (``blur_sigma_range``) unless ``blur_sigma`` is given.
    """

    def __init__(self, size: int = 224, scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5, jitter_p: float = 0.8,
                 hue: float = 0.1, grayscale_p: float = 0.2, blur_p: float = 0.5,
                 blur_sigma: tuple[float, float] | None = None, normalize: bool = True):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        for name, p in (("flip_p", flip_p), ("jitter_p", jitter_p), ("grayscale_p", grayscale_p),
                        ("blur_p", blur_p)):
            if not 0 <= p <= 1:
                raise ValueError(f"{name} is a probability and must be between 0 and 1, got {p}")
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue is a share of the colour circle and must be between 0 and 0.5, got {hue}")
        self.size = size
        self.scale = scale
        self.ratio = ratio
        self.flip_p = flip_p
        # the appearance settings, also read by the device path (mls.data.device_views)
        self.jitter_p, self.hue, self.grayscale_p, self.blur_p = jitter_p, hue, grayscale_p, blur_p
        self.blur_sigma = tuple(blur_sigma or blur_sigma_range(size))
        self.normalize = normalize
        blur = v2.GaussianBlur(blur_kernel_size(size), sigma=self.blur_sigma)
        appearance = [  # jitter and grayscale are fastest on PIL images, the blur on float tensors
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, hue)], p=jitter_p),
            v2.RandomGrayscale(p=grayscale_p),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.RandomApply([blur], p=blur_p),
        ]
        if normalize:
            appearance.append(v2.Normalize(IMAGENET_MEAN, IMAGENET_STD))
        self.appearance = v2.Compose(appearance)

    def crop_and_flip(self, img: Image.Image | torch.Tensor) -> tuple[Image.Image | torch.Tensor, torch.Tensor, bool]:
        """The random-resized crop, maybe mirrored, of a PIL image or a uint8 (3, H, W) tensor; its box; the flip."""
        height, width = F.get_size(img)
        top, left, h, w = RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        crop = F.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
        flipped = bool(torch.rand(()) < self.flip_p)
        if flipped:
            crop = F.horizontal_flip(crop)
        box = torch.tensor([left / width, top / height, (left + w) / width, (top + h) / height])
        return crop, box, flipped

    def __call__(self, img: Image.Image) -> View:
        crop, box, flipped = self.crop_and_flip(img)
        return View(self.appearance(crop).as_subclass(torch.Tensor), box, flipped)


@dataclass(frozen=True)
class ViewConfig:
    """The settings of the pretraining views; defaults are MoCo-v2's (main paper §4.1)."""

    image_size: int = setting(224, "side of the random-resized crops")
    min_scale: float = setting(0.2, "smallest crop area of RandomResizedCrop, as a share of the image (MoCo-v2: 0.2)")
    hue: float = setting(0.1, "largest hue shift of the colour jitter, as a share of the colour circle (MoCo-v2: "
                              "0.1); the built-in scenes' classes differ by hue, so the demo keeps it at 0")
    grayscale_p: float = setting(0.2, "probability of a grayscale view (MoCo-v2: 0.2; the demo: 0, for the same "
                                      "reason)")
    blur: bool = setting(True, "Gaussian blur with p = 0.5 (MoCo-v2: sigma 0.1-2 px at 224 px, scaled with the "
                               "image size)")

    def __post_init__(self):
        self.transform()  # MoCoV2View checks every value

    def transform(self) -> MoCoV2View:
        """MoCo-v2's view with these settings."""
        return MoCoV2View(self.image_size, scale=(self.min_scale, 1.0), hue=self.hue, grayscale_p=self.grayscale_p,
                          blur_p=0.5 if self.blur else 0.0)


class TwoViewDataset(Dataset):
    """Two views of each source image, with their crop boxes, for MoCo / MLS pretraining.

    An unreadable file is replaced by the next index (wrapping around), up to ``max_skips`` times;
    ``failed`` counts the files skipped for this sample so that the training loop can sum and
    report them across workers and ranks, and ``index`` is the image actually used.

    ``tensors=True`` reads each image as a uint8 tensor where the source can (``pixels``: the fast
    JPEG path) for a transform that takes tensors; a view that carries ``appearance`` parameters
    (drawn here, applied on the device) adds them to the sample as ``appearance1`` / ``appearance2``.
    """

    def __init__(self, source, transform, max_skips: int = 16, tensors: bool = False):
        self.source = source
        self.transform = transform
        self.max_skips = max_skips
        self.tensors = tensors

    def _read(self, index: int):
        if self.tensors and hasattr(self.source, "pixels"):
            return self.source.pixels(index)
        return self.source.image(index)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        failures = []
        for failed in range(min(self.max_skips, len(self.source) - 1) + 1):
            index = (i + failed) % len(self.source)
            try:
                img = self._read(index)
            except UnreadableImage as error:
                failures.append(str(error))
                continue
            view1, view2 = self.transform(img), self.transform(img)
            sample = {
                "view1": view1.image, "view2": view2.image, "box2": view2.box, "index": index, "failed": failed,
            }
            for n, view in ((1, view1), (2, view2)):
                if getattr(view, "appearance", None) is not None:
                    sample[f"appearance{n}"] = view.appearance
            return sample
        raise RuntimeError(
            f"{len(failures)} consecutive unreadable images from index {i}; the last: {failures[-1]}")
