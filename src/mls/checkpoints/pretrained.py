"""Reading and writing pretraining checkpoints, and loading a backbone from any weights.

A pretraining checkpoint is Lightning's: ``state_dict`` holds the ``MLS`` module under
``model.`` (both encoders and the queues) and ``hyper_parameters`` holds ``model`` (the
``MLSConfig`` fields), ``data`` (what it was trained on) and ``mls_version``. Checkpoints of
earlier versions, from mls 0.2 on, still load: every loader reads them through
``mls.checkpoints.versions.upgrade``, which says what each version wrote.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mls
from mls.checkpoints.versions import upgrade, written_by
from mls.files import atomic_write
from mls.method.backbones import build_backbone
from mls.method.model import MLS
from mls.method.settings import MLSConfig, from_dict

PREFIX = "model."


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a half-written file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


class UnreadableCheckpoint(ValueError):
    """A checkpoint or weights file that exists but cannot be loaded: empty, truncated, damaged or foreign."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"cannot read {path}: {reason}")
        self.path, self.reason = str(path), reason


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
PICKLE_MAGIC = b"\x80"  # a pickle of protocol 2 or later: the legacy torch.save format, or a plain pickle


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def _unreadable_reason(path: Path, error: Exception) -> str:
    """What is wrong with a file torch.load failed on, in words, from its first bytes and the error."""
    size, head = path.stat().st_size, _head(path)
    said = str(error).splitlines()[0].split(". ")[0] if str(error) else type(error).__name__
    if size == 0:
        return "the file is empty"
    if head == ZIP_MAGIC:
        return f"the file is truncated or damaged ({size:,} bytes; torch.load: {said})"
    if head.startswith(PICKLE_MAGIC):
        if isinstance(error, EOFError):
            return f"the file is truncated ({size:,} bytes)"
        return (f"it is a pickle but not one torch.load can read: a plain pickle (e.g. a detectron2 .pkl) or a "
                f"damaged legacy checkpoint (torch.load: {said})")
    return f"it is not a PyTorch checkpoint (torch.save file); it starts with {head!r}"


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> Any:
    """``torch.load`` of a checkpoint or weights file onto the CPU.

    A missing file raises ``FileNotFoundError``; one that cannot be loaded (empty, truncated, damaged,
    not a torch.save file) ``UnreadableCheckpoint``, naming the file and what is wrong, in one line.
    ``mmap=True`` maps the tensors instead of reading them (for looking at a few fields of a large file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":  # exported weights (mls export --format safetensors or timm)
        return _read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, ImportError, AttributeError, IndexError,
            KeyError, TypeError, UnicodeDecodeError) as error:
        if mmap and _head(path) != ZIP_MAGIC:  # mmap needs the zip format: try the plain way
            return read_checkpoint(path)
        raise UnreadableCheckpoint(path, _unreadable_reason(path, error)) from None
    except OSError as error:
        raise UnreadableCheckpoint(path, error.strerror or str(error)) from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or ``UnreadableCheckpoint`` saying what is wrong with it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as error:
        said = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UnreadableCheckpoint(path, "the file is empty" if path.stat().st_size == 0
                                   else f"it is not a readable safetensors file (safetensors: {said})") from None


def is_pretraining_checkpoint(ckpt: dict) -> bool:
    return isinstance(ckpt, dict) and "state_dict" in ckpt and "model" in ckpt.get("hyper_parameters", {})


def model_config(ckpt: dict) -> MLSConfig:
    """The ``MLSConfig`` of a pretraining checkpoint as ``upgrade`` returns it."""
    return from_dict(MLSConfig, ckpt["hyper_parameters"]["model"])


def load_pretrained(path: str | os.PathLike) -> tuple[MLS, dict]:
    """The ``MLS`` module of a pretraining checkpoint, queues included, and its hyper-parameters.

    ``info["model"]`` holds every field of the model's ``MLSConfig`` (``model.config``), also for
    checkpoints of older versions.
    """
    ckpt = read_checkpoint(path)
    if not is_pretraining_checkpoint(ckpt):
        raise ValueError(f"{path} is not a pretraining checkpoint of `mls pretrain` (no model hyper-parameters)")
    return _pretrained(ckpt, path)


def _pretrained(ckpt: dict, path: str | os.PathLike) -> tuple[MLS, dict]:
    ckpt = upgrade(ckpt, path)
    info, config = dict(ckpt["hyper_parameters"]), model_config(ckpt)
    model = MLS(config)
    state = {k[len(PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(PREFIX)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} (mls {written_by(ckpt)}) does not fit its own settings: missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval(), {**info, "model": dataclasses.asdict(config)}


def save_pretrained(path: str | os.PathLike, model: MLS, info: dict | None = None) -> None:
    """Write ``model`` in the pretraining checkpoint format, with its settings and ``info`` (e.g. ``data``)."""
    state = {PREFIX + k: v for k, v in model.state_dict().items()}
    hyper = {**(info or {}), "model": dataclasses.asdict(model.config), "mls_version": mls.__version__}
    atomic_save({"state_dict": state, "hyper_parameters": hyper}, path)


def infer_arch(state: dict[str, torch.Tensor]) -> tuple[str, bool]:
    """The ResNet and stem a torchvision-named state_dict was made for, from its keys and shapes."""
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layer3."))
    bottleneck = "layer1.0.conv3.weight" in state
    arch = {(2, False): "resnet18", (6, False): "resnet34", (6, True): "resnet50", (23, True): "resnet101"}.get(
        (blocks, bottleneck))
    if arch is None:
        raise ValueError("the weights are not those of a torchvision resnet18/34/50/101")
    return arch, state["conv1.weight"].shape[-1] == 3


def backbone_info(weights: str, arch: str | None = None, small_stem: bool | None = None,
                  ckpt: dict | None = None) -> dict:
    """What ``load_backbone`` would build — ``arch``, ``small_stem``, ``image_size`` (the pretraining
    resolution when known) — read from the file's metadata, without building a network."""
    if weights == "random":
        return {"arch": arch or "resnet50", "small_stem": bool(small_stem), "image_size": None}
    ckpt = read_checkpoint(weights) if ckpt is None else ckpt
    if is_pretraining_checkpoint(ckpt):
        config = model_config(upgrade(ckpt, weights))
        return {"arch": config.arch, "small_stem": config.small_stem,
                "image_size": ckpt["hyper_parameters"].get("data", {}).get("image_size")}
    state = _torchvision_state(ckpt, weights)
    found_arch, found_small = infer_arch(state)
    if (arch or found_arch) != found_arch:
        raise ValueError(f"{weights} holds {found_arch} weights, not {arch}")
    return {"arch": found_arch, "small_stem": found_small if small_stem is None else small_stem,
            "image_size": _exported_image_size(weights)}


def _exported_image_size(weights: str) -> int | None:
    """The pretraining image size an ``mls export`` safetensors file records in its header, else None (a
    torchvision pickle records none)."""
    if Path(weights).suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(weights, "pt") as f:
        size = (f.metadata() or {}).get("image_size", "")
    return int(size) if size.isdigit() else None


def _torchvision_state(ckpt, weights: str) -> dict:
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or "conv1.weight" not in state:
        raise ValueError(f"{weights} holds neither a pretraining checkpoint nor torchvision ResNet weights")
    return state


def load_backbone(
    weights: str, arch: str | None = None, small_stem: bool | None = None
) -> tuple[nn.Module, int, dict]:
    """A torchvision ResNet (``fc = Identity``) with the query-encoder weights of ``weights``.

    ``weights`` is a pretraining checkpoint, exported torchvision or safetensors weights, or
    ``"random"``. Returns the backbone, its feature size and ``backbone_info``'s dict.
    """
    ckpt = None if weights == "random" else read_checkpoint(weights)
    info = backbone_info(weights, arch, small_stem, ckpt)
    if ckpt is not None and is_pretraining_checkpoint(ckpt):
        model, _ = _pretrained(ckpt, weights)
        return model.backbone_q.train(), model.feature_dim, info  # the same mode as a fresh network
    backbone, dim = build_backbone(info["arch"], info["small_stem"])
    if ckpt is None:
        return backbone, dim, info
    state = _torchvision_state(ckpt, weights)
    missing, unexpected = backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")},
                                                   strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights} does not fit {info['arch']}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return backbone, dim, info
