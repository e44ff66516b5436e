"""The network that turns an image into its embedding, built from ``EmbedSettings``: the weights, the features
(pooled backbone or projection), the centre crop of the evaluation protocols and the precision.

``mls embed`` embeds a collection with it and ``mls search --query`` its query images, from the same recorded
settings, so that both land in one space.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from mls.checkpoints.pretrained import backbone_info, load_backbone, load_pretrained
from mls.data.images import UnreadableImage
from mls.embedding.settings import EmbedSettings
from mls.eval.transforms import test_transform

DEFAULT_IMAGE_SIZE = 224  # when neither the options nor the weights give one
RANDOM_SEED = 0  # the seed of "random" weights: the same network in every run


def file_digest(path: str) -> str:
    """The sha256 of a file, by blocks: what identifies the weights an output was made with."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def mixed_precision(device_type: str) -> str:
    """``--precision auto``: bf16 autocast on a GPU that has it, fp16 on another, full precision on the CPU."""
    if device_type != "cuda":
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def resolve(settings: EmbedSettings, device_type: str) -> tuple[EmbedSettings, str]:
    """``settings`` with every default decided: architecture, stem and image size from the weights, the precision
    from the device; and where the image size came from, in words. Two runs give the same values only when their
    resolved settings are equal."""
    if settings.weights != "random" and not Path(settings.weights).is_file():
        raise FileNotFoundError(f"weights {settings.weights!r} do not exist")
    info = backbone_info(settings.weights, settings.arch, settings.small_stem)
    precision = mixed_precision(device_type) if settings.precision == "auto" else settings.precision
    if settings.image_size:
        origin = "--image-size"
    elif info.get("image_size"):
        origin = "the size the weights were pretrained at"
    elif settings.weights == "random":
        origin = "the default for a random network; --image-size sets it"
    else:
        origin = ("the default: the weights record no pretraining size; give --image-size the size they were "
                  "pretrained at")
    return dataclasses.replace(settings, arch=info["arch"], small_stem=info["small_stem"], precision=precision,
                               image_size=settings.image_size or info.get("image_size") or DEFAULT_IMAGE_SIZE), origin


def build_network(settings: EmbedSettings) -> nn.Module:
    """The backbone (pooled features) or backbone + projection head of ``settings.weights``, in eval mode."""
    if settings.features == "projection":
        try:
            model, _ = load_pretrained(settings.weights)
        except ValueError as error:
            raise ValueError(f"--features projection needs a pretraining checkpoint: {error}") from None
        return nn.Sequential(model.backbone_q, nn.Flatten(1), model.head_q).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        backbone, _, _ = load_backbone(settings.weights, settings.arch, settings.small_stem)
    return backbone.eval()


class Encoder:
    """Images (already cropped) to embeddings (float32 on the CPU, L2-normalised when asked), on ``device``
    under the settings' precision (autocast when mixed)."""

    def __init__(self, settings: EmbedSettings, device: torch.device):
        self.settings, self.device = settings, device
        self.network = build_network(settings).to(device)
        self.transform = test_transform(settings.image_size)
        mixed = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
        self.autocast_dtype = mixed.get(settings.precision)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        images = images.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = self.network(images).flatten(1)
        out = out.float()
        return (F.normalize(out, dim=1) if self.settings.normalize else out).cpu()


class CenterCrops(Dataset):
    """Each image of a source as the evaluation protocols crop a test image; an unreadable one as zeros with its
    reason (the batch keeps its shape, the row is dropped after)."""

    def __init__(self, source, transform, image_size: int):
        self.source, self.transform, self.image_size = source, transform, image_size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        try:
            return {"image": self.transform(self.source.image(i)), "index": i, "error": ""}
        except UnreadableImage as error:
            return {"image": torch.zeros(3, self.image_size, self.image_size), "index": i, "error": error.reason}
