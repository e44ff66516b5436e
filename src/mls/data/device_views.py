"""MoCo-v2 views made on the device: the workers crop, flip and draw; the batch is jittered where it lives.

With ``augment_on="device"`` a data-loader worker decodes the image, takes the random-resized crop and
the flip (``MoCoV2View.crop_and_flip``, so the boxes are the CPU path's) and sends the view as uint8,
with the random parameters of its colour jitter, grayscale and blur drawn there as small tensors.
The draws are torchvision's own calls in torchvision's order (``RandomApply``, ``ColorJitter``,
``RandomGrayscale``, ``GaussianBlur``), so under the per-sample seed of ``SeededSamples`` a sample
gets the same crop, flip and parameters on either path, whatever the number of workers.
``apply_appearance`` then applies them to the whole batch on its device with kornia's
torchvision-compatible kernels, each sample its own factors and its own order of the four jitter
steps, as torchvision's ``ColorJitter`` does (``torch.randperm(4)`` per image), without waiting for
the device. The views match the CPU path's to about a grey level: its PIL jitter truncates to whole
levels after each step, these kernels work in float.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import kornia
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms.v2 import functional as F

from mls.data.augment import MoCoV2View, blur_kernel_size
from mls.method.backbones import IMAGENET_MEAN, IMAGENET_STD

JITTER_RANGE = 0.4  # MoCo-v2's brightness, contrast and saturation: factors uniform in [0.6, 1.4]
IDENTITY = (1.0, 1.0, 1.0, 0.0)  # brightness, contrast, saturation, hue factors that change nothing


class DeviceView(NamedTuple):
    """A view as a worker sends it: uint8 crop, its box and flip (as in ``View``), and its appearance draws."""

    image: torch.Tensor
    box: torch.Tensor
    flipped: bool
    appearance: dict[str, torch.Tensor]


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high).item())  # ColorJitter's and GaussianBlur's own draw


def draw_appearance(view: MoCoV2View) -> dict[str, torch.Tensor]:
    """The random parameters of ``view.appearance``, drawn with the calls, in the order, that it makes them.

    ``factors`` holds brightness, contrast, saturation (multipliers) and hue (share of the colour
    circle), ``order`` the sequence in which the jitter applies them (0..3 in that same numbering).
    A step that is not applied keeps identity values, so the tensors have one shape for every sample.
    """
    factors, order = torch.tensor(IDENTITY), torch.arange(4)
    jitter = bool(torch.rand(1) < view.jitter_p)  # RandomApply([ColorJitter], p)
    if jitter:
        order = torch.randperm(4)
        factors[:3] = torch.tensor([_uniform(1 - JITTER_RANGE, 1 + JITTER_RANGE) for _ in range(3)])
        if view.hue > 0:  # ColorJitter draws no hue for hue=0
            factors[3] = _uniform(-view.hue, view.hue)
    gray = bool(torch.rand(1) < view.grayscale_p)  # RandomGrayscale(p)
    blur = bool(torch.rand(1) < view.blur_p)  # RandomApply([GaussianBlur], p)
    sigma = _uniform(*view.blur_sigma) if blur else 0.0
    return {"jitter": torch.tensor(jitter), "order": order, "factors": factors, "gray": torch.tensor(gray),
            "blur": torch.tensor(blur), "sigma": torch.tensor(sigma)}


class WorkerView:
    """The workers' share of a ``MoCoV2View`` when the appearance steps run on the device.

    Takes a PIL image or a uint8 (3, H, W) tensor (the fast JPEG path) and returns a ``DeviceView``.
    """

    def __init__(self, view: MoCoV2View):
        self.view = view

    def __call__(self, img: Image.Image | torch.Tensor) -> DeviceView:
        crop, box, flipped = self.view.crop_and_flip(img)
        if isinstance(crop, Image.Image):
            crop = F.pil_to_tensor(crop)
        return DeviceView(crop.contiguous(), box, flipped, draw_appearance(self.view))


def plan_appearance(params: dict[str, torch.Tensor]) -> dict:
    """Which samples each step touches, as index tensors, worked out where ``params`` are (the CPU).

    ``jitter_steps[4 * k + j]`` lists the samples whose k-th jitter step is operation j (only those
    whose factor j changes something); ``blurred`` the samples to blur. Index tensors of known length
    let the device select and write back sub-batches without waiting for the device (a boolean mask
    would need a device-to-host copy to know how many samples it selects).
    """
    jitter, order, factors = params["jitter"], params["order"], params["factors"]
    changes = jitter[:, None] & (factors != torch.tensor(IDENTITY))  # (B, 4), op j changes sample b
    steps = []
    for k in range(4):
        for j in range(4):
            steps.append(torch.nonzero((order[:, k] == j) & changes[:, j]).flatten())
    return {**params, "jitter_steps": steps, "blurred": torch.nonzero(params["blur"]).flatten()}


def collate_views(samples: list[dict]) -> dict:
    """``default_collate``, then ``plan_appearance`` for each view's parameters (run in the worker)."""
    batch = default_collate(samples)
    for key in ("appearance1", "appearance2"):
        if key in batch:
            batch[key] = plan_appearance(batch[key])
    return batch


_JITTER = (  # torchvision's F.adjust_* in kornia's batched form: factor (B,) per sample; hue as a share of 2 pi
    kornia.enhance.adjust_brightness_accumulative,
    kornia.enhance.adjust_contrast_with_mean_subtraction,
    kornia.enhance.adjust_saturation_with_gray_subtraction,
    lambda x, f: kornia.enhance.adjust_hue(x, f * 2 * math.pi),
)


def _apply_to(x: torch.Tensor, index: torch.Tensor, fn) -> None:
    """``x[index] = fn(x[index])`` in place; nothing to do for an empty index (its length is known on the host)."""
    if index.numel():
        x.index_copy_(0, index, fn(x.index_select(0, index)))


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """torchvision's ``gaussian_blur`` (kernel ``blur_kernel_size``, reflected borders), one sigma per sample.

    kornia's ``gaussian_blur2d`` itself, less its check that every sigma is positive, which reads a
    device tensor back to the host and so waits for the device.
    """
    kernel = kornia.filters.get_gaussian_kernel1d(blur_kernel_size(x.shape[-1]), sigma[:, None])
    return kornia.filters.filter2d_separable(x, kernel, kernel, border_type="reflect")


@torch.no_grad()
def apply_appearance(images: torch.Tensor, params: dict, normalize: bool = True) -> torch.Tensor:
    """MoCo-v2's appearance steps on a uint8 (B, 3, S, S) batch with each sample's drawn parameters.

    Colour jitter (each sample's four steps in its own order), grayscale, Gaussian blur (kernel
    ``blur_kernel_size(S)``, each sample's sigma), then ImageNet normalisation; float32 out, on the
    device of ``images``. ``params`` are ``draw_appearance``'s, batched (``collate_views``); without
    their plan it is worked out here, which on a GPU waits for the parameters to arrive.
    """
    if "jitter_steps" not in params:
        params = plan_appearance({k: v.cpu() for k, v in params.items()})
    device = images.device
    x = images.float().div_(255)
    factors = params["factors"].to(device, torch.float32)
    for step, index in enumerate(params["jitter_steps"]):
        index = index.to(device)
        op = _JITTER[step % 4]
        _apply_to(x, index, lambda sub: op(sub, factors.index_select(0, index)[:, step % 4]))  # noqa: B023 (called here)
    gray = params["gray"].to(device)[:, None, None, None]
    x = torch.where(gray, kornia.color.rgb_to_grayscale(x).expand_as(x), x)
    blurred = params["blurred"].to(device)
    sigma = params["sigma"].to(device, torch.float32)
    _apply_to(x, blurred, lambda sub: _blur(sub, sigma.index_select(0, blurred)))
    if normalize:
        mean, std = _imagenet_statistics(device)
        x = (x - mean) / std
    return x


@lru_cache
def _imagenet_statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet's mean and std as (3, 1, 1) tensors on ``device``, made once: a tensor made from a host list
    on a GPU is a copy from pageable memory, which waits for all the work queued before it."""
    return (torch.tensor(IMAGENET_MEAN, device=device)[:, None, None],
            torch.tensor(IMAGENET_STD, device=device)[:, None, None])
