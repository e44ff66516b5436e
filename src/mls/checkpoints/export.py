"""Export of the query backbone ``f_q`` for downstream use: torchvision and detectron2 formats.

Only the query backbone leaves the checkpoint; the momentum encoder, the projection
heads and the queues stay behind, as in MoCo's ``convert-pretrain-to-detectron2.py``.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from mls.files import atomic_write, ensure_writable

FORMATS = ("torchvision", "detectron2")


def backbone_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The torchvision-named state of a ResNet backbone, without the (identity) classifier."""
    return {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items() if not k.startswith("fc.")}


def detectron2_name(name: str) -> str:
    """Rename one torchvision ResNet key the way MoCo's detectron2 converter does.

    ``layerN`` -> ``res{N+1}``, ``bnK`` -> ``convK.norm``, ``downsample.0/1`` -> ``shortcut(.norm)``,
    and the stem ``conv1``/``bn1`` -> ``stem.conv1``/``stem.conv1.norm``.
    """
    if not name.startswith("layer"):
        name = "stem." + name
    for n in (1, 2, 3, 4):
        name = name.replace(f"layer{n}", f"res{n + 1}")
    for n in (1, 2, 3):
        name = name.replace(f"bn{n}", f"conv{n}.norm")
    return name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def detectron2_checkpoint(state: dict[str, torch.Tensor]) -> dict:
    """The pickled dict detectron2's ``DetectionCheckpointer`` reads (numpy arrays, renamed keys)."""
    model = {detectron2_name(k): v.numpy() for k, v in state.items()}
    return {"model": model, "__author__": "mls", "matching_heuristics": True}


def save_backbone(state: dict[str, torch.Tensor], out: str | os.PathLike, format: str = "torchvision") -> Path:
    """Write a backbone state in ``format`` to ``out``, atomically."""
    if format not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format == "torchvision":
        return atomic_write(out, lambda tmp: torch.save(state, tmp))
    payload = detectron2_checkpoint(state)

    def write_pickle(tmp: str) -> None:
        with open(tmp, "wb") as f:
            pickle.dump(payload, f)

    return atomic_write(out, write_pickle)


SUFFIXES = {"torchvision": ".pth", "detectron2": ".pkl"}


def export(checkpoint: str, format: Literal["torchvision", "detectron2"] = "torchvision",
           out: str | None = None) -> Path:
    """Export the query backbone of a pretraining checkpoint for downstream training.

    Args:
        checkpoint: Pretraining checkpoint (``.ckpt``) of ``mls pretrain``, or an exported torchvision state_dict.
        format: ``torchvision`` (plain ResNet state_dict, no ``fc``) or ``detectron2`` (MoCo's key renaming).
        out: Output file; default: beside the checkpoint, ``<name>.torchvision.pth`` or ``<name>.detectron2.pkl``.
    """
    from mls.checkpoints.pretrained import load_backbone

    if format not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    out = out or str(Path(checkpoint).with_suffix(f".{format}{SUFFIXES[format]}"))
    ensure_writable(out)
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist")
    backbone, _, info = load_backbone(checkpoint)
    state = backbone_state(backbone)
    path = save_backbone(state, out, format)
    print(f"wrote {len(state)} tensors of the query backbone ({info['arch']}) to {path}")
    if info["small_stem"]:
        print("note: the backbone has the small-image stem (3x3 conv1, no max-pool); "
              "build the target network with the same stem before loading these weights")
    return path
