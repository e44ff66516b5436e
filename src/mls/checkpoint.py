"""Reading and writing pretraining checkpoints, and loading a backbone from any weights.

A pretraining checkpoint is Lightning's: ``state_dict`` holds the ``MLS`` module under
``model.`` (both encoders and the queues) and ``hyper_parameters`` holds ``model`` (the
``MLS`` keyword arguments) and ``data`` (what it was trained on).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mls.backbones import ARCHS, build_backbone
from mls.files import atomic_write
from mls.model import MLS

PREFIX = "model."


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a half-written file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def read_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def is_pretraining_checkpoint(ckpt: dict) -> bool:
    return isinstance(ckpt, dict) and "state_dict" in ckpt and "model" in ckpt.get("hyper_parameters", {})


def load_pretrained(path: str | os.PathLike) -> tuple[MLS, dict]:
    """The ``MLS`` module of a pretraining checkpoint, queues included, and its hyper-parameters."""
    ckpt = read_checkpoint(path)
    if not is_pretraining_checkpoint(ckpt):
        raise ValueError(f"{path} is not a pretraining checkpoint of `mls pretrain` (no model hyper-parameters)")
    info = dict(ckpt["hyper_parameters"])
    model = MLS(**info["model"])
    state = {k[len(PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(PREFIX)}
    model.load_state_dict(state)
    return model.eval(), info


def save_pretrained(path: str | os.PathLike, model: MLS, info: dict) -> None:
    """Write ``model`` in the pretraining checkpoint format (``info`` needs ``model``: its kwargs)."""
    state = {PREFIX + k: v for k, v in model.state_dict().items()}
    atomic_save({"state_dict": state, "hyper_parameters": dict(info)}, path)


def infer_arch(state: dict[str, torch.Tensor]) -> tuple[str, bool]:
    """The ResNet and stem a torchvision-named state_dict was made for, from its keys and shapes."""
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layer3."))
    bottleneck = "layer1.0.conv3.weight" in state
    arch = {(2, False): "resnet18", (6, False): "resnet34", (6, True): "resnet50", (23, True): "resnet101"}.get(
        (blocks, bottleneck))
    if arch is None:
        raise ValueError("the weights are not those of a torchvision resnet18/34/50/101")
    return arch, state["conv1.weight"].shape[-1] == 3


def load_backbone(
    weights: str, arch: str | None = None, small_stem: bool | None = None
) -> tuple[nn.Module, int, dict]:
    """A torchvision ResNet (``fc = Identity``) with the query-encoder weights of ``weights``.

    ``weights`` is a pretraining checkpoint, an exported torchvision state_dict, or
    ``"random"``. Returns the backbone, its feature size and ``info`` (``arch``,
    ``small_stem``, ``image_size``: the pretraining resolution when known).
    """
    if weights == "random":
        arch, small_stem = arch or "resnet50", bool(small_stem)
        backbone, dim = build_backbone(arch, small_stem)
        return backbone, dim, {"arch": arch, "small_stem": small_stem, "image_size": None}
    ckpt = read_checkpoint(weights)
    if is_pretraining_checkpoint(ckpt):
        model, info = load_pretrained(weights)
        kwargs = info["model"]
        backbone, dim = model.backbone_q.train(), model.feature_dim  # the same mode as a fresh network
        return backbone, dim, {"arch": kwargs.get("arch", "resnet50"), "small_stem": kwargs.get("small_stem", False),
                               "image_size": info.get("data", {}).get("image_size")}
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or "conv1.weight" not in state:
        raise ValueError(f"{weights} holds neither a pretraining checkpoint nor torchvision ResNet weights")
    found_arch, found_small = infer_arch(state)
    arch = arch or found_arch
    small_stem = found_small if small_stem is None else small_stem
    if arch not in ARCHS or arch != found_arch:
        raise ValueError(f"{weights} holds {found_arch} weights, not {arch}")
    backbone, dim = build_backbone(arch, small_stem)
    missing, unexpected = backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")},
                                                   strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights} does not fit {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return backbone, dim, {"arch": arch, "small_stem": small_stem, "image_size": None}
