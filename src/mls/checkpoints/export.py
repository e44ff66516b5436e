"""Export of the query backbone ``f_q`` for other tools: torchvision, detectron2, safetensors, timm and ONNX.

Only the query backbone leaves the checkpoint; the momentum encoder, the projection
heads and the queues stay behind, as in MoCo's ``convert-pretrain-to-detectron2.py``.
torchvision and timm name a ResNet's tensors alike (``conv1``, ``layer1.0.bn1``, ...), so one state serves
both; the safetensors files (no pickle) carry the architecture, the mls version and the source as metadata,
and the ONNX graph maps a batch of images to the pooled features.
"""
from __future__ import annotations

import os
import pickle
import typing
from pathlib import Path
from typing import Literal

import torch
from torch import nn

import mls
from mls.files import atomic_write, ensure_writable

Format = Literal["torchvision", "detectron2", "safetensors", "timm", "onnx"]
FORMATS = typing.get_args(Format)
# What a file of each format is called beside its checkpoint: last.ckpt -> last.torchvision.pth, last.onnx, ...
ENDINGS = {"torchvision": ".torchvision.pth", "detectron2": ".detectron2.pkl", "safetensors": ".safetensors",
           "timm": ".timm.safetensors", "onnx": ".onnx"}
ONNX_OPSET = 18


def backbone_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The torchvision-named state of a ResNet backbone, without the (identity) classifier, in plain row-major
    memory (a channels-last run's tensors too, which safetensors would refuse)."""
    return {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in backbone.state_dict().items()
            if not k.startswith("fc.")}


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


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")


def save_backbone(state: dict[str, torch.Tensor], out: str | os.PathLike, format: str = "torchvision",
                  metadata: dict[str, str] | None = None) -> Path:
    """Write a backbone state in ``format`` (any but onnx, which needs the network) to ``out``, atomically;
    ``metadata`` goes into the header of a safetensors file (timm's format is one)."""
    _check_format(format)
    if format == "onnx":
        raise ValueError("the onnx format is written from the network (save_onnx), not from its state")
    if format in ("safetensors", "timm"):
        from safetensors.torch import save_file

        return atomic_write(out, lambda tmp: save_file(state, tmp, metadata=metadata))
    if format == "torchvision":
        return atomic_write(out, lambda tmp: torch.save(state, tmp))
    payload = detectron2_checkpoint(state)

    def write_pickle(tmp: str) -> None:
        with open(tmp, "wb") as f:
            pickle.dump(payload, f)

    return atomic_write(out, write_pickle)


def save_onnx(backbone: nn.Module, out: str | os.PathLike, image_size: int = 224,
              metadata: dict[str, str] | None = None) -> Path:
    """Write the backbone in inference mode as an ONNX graph, atomically: input ``images`` (N x 3 x H x W, each
    dimension but the channels free; traced at ``image_size``), output ``features`` (N x dg, the pooled
    features). The weights sit inside the one file; ``metadata`` goes into the model's properties."""
    import copy

    from torch.export import Dim

    network = copy.deepcopy(backbone).cpu().float().eval()
    example = torch.zeros(2, 3, image_size, image_size)
    program = torch.onnx.export(network, (example,), input_names=["images"], output_names=["features"],
                                dynamic_shapes=({0: Dim("batch"), 2: Dim("height"), 3: Dim("width")},),
                                opset_version=ONNX_OPSET, dynamo=True, external_data=False, verbose=False)
    program.model.metadata_props.update(metadata or {})
    return atomic_write(out, lambda tmp: program.save(tmp, external_data=False))


def export_metadata(info: dict, format: str, source: str | os.PathLike) -> dict[str, str]:
    """What an exported file says of itself: the network (``arch``, ``small_stem``, the pretraining
    ``image_size`` where known), the mls version that wrote it and the file it came from."""
    meta = {"format": f"mls backbone, {format}", "arch": info["arch"], "small_stem": str(bool(info["small_stem"])),
            "mls_version": mls.__version__, "source": str(source)}
    if info.get("image_size"):
        meta["image_size"] = str(info["image_size"])
    if format == "timm":
        meta["timm_model"] = info["arch"]  # timm's ResNets are named, and their tensors keyed, as torchvision's
    return meta


def write_backbone(backbone: nn.Module, info: dict, out: str | os.PathLike, format: str,
                   source: str | os.PathLike) -> Path:
    """Write a backbone (as ``load_backbone`` returns it, with its ``info``) in ``format`` to ``out``."""
    metadata = export_metadata(info, format, source)
    if format == "onnx":
        return save_onnx(backbone, out, info.get("image_size") or 224, metadata)
    return save_backbone(backbone_state(backbone), out, format, metadata)


def export_backbone(checkpoint: str | os.PathLike, format: str = "torchvision",
                    out: str | os.PathLike | None = None) -> tuple[Path, dict]:
    """The query backbone of ``checkpoint`` written in ``format`` to ``out`` (default: beside the checkpoint,
    ``ENDINGS``), checked before the work; returns the file and ``load_backbone``'s info."""
    from mls.checkpoints.pretrained import load_backbone

    _check_format(format)
    out = Path(out or Path(checkpoint).with_suffix(ENDINGS[format]))
    ensure_writable(out)
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {str(checkpoint)!r} does not exist")
    if out.resolve() == Path(checkpoint).resolve():
        raise ValueError(f"the output {str(out)!r} is the checkpoint itself; choose another --out")
    backbone, _, info = load_backbone(str(checkpoint))
    return write_backbone(backbone, info, out, format, checkpoint), info


def export(checkpoint: str, format: Format = "torchvision", out: str | None = None) -> Path:
    """Export the query backbone of a pretraining checkpoint for other tools.

    Args:
        checkpoint: Pretraining checkpoint (``.ckpt``) of ``mls pretrain``, or exported torchvision or safetensors
            weights.
        format: ``torchvision`` (plain ResNet state_dict, no ``fc``, a pickle), ``detectron2`` (MoCo's key
            renaming), ``safetensors`` (torchvision's names, no pickle; arch, mls version and source as
            metadata), ``timm`` (the same, for ``timm.create_model(arch, num_classes=0)``) or ``onnx`` (images
            to pooled features, any batch and image size).
        out: Output file; default: beside the checkpoint, ``<name>.torchvision.pth``, ``<name>.detectron2.pkl``,
            ``<name>.safetensors``, ``<name>.timm.safetensors`` or ``<name>.onnx``.
    """
    path, info = export_backbone(checkpoint, format, out)
    what = "an ONNX graph of images to pooled features" if format == "onnx" else format
    print(f"wrote the query backbone ({info['arch']}) as {what} to {path}")
    if info["small_stem"] and format != "onnx":
        print("note: the backbone has the small-image stem (3x3 conv1, no max-pool); "
              "build the target network with the same stem before loading these weights")
    return path
