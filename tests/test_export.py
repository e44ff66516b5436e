"""``mls export``: the query backbone alone, loadable by torchvision, named as detectron2 expects."""
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from conftest import tiny_checkpoint
from mls.checkpoints.export import detectron2_checkpoint, export
from mls.cli import main
from mls.files import atomic_write

DATA = dict(data=None, annotations=None, num_images=40, image_size=32, seed=0)


def distinguish(model):
    """Momentum encoder and running statistics unlike the query backbone's and torchvision's, so a mix-up shows."""
    for p in model.backbone_k.parameters():
        p.add_(1.0)
    for name, buf in model.backbone_q.named_buffers():
        if "running" in name:
            buf.uniform_(0.5, 1.5)


def pretrained(path, **kwargs):
    """A checkpoint whose momentum encoder and heads differ from the query backbone, so a mix-up shows."""
    return tiny_checkpoint(path, DATA, prepare=distinguish, **kwargs)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "last.ckpt"
    return path, pretrained(path)


def test_torchvision_state_loads_with_only_fc_missing(ckpt, tmp_path):
    path, model = ckpt
    main(["export", str(path), "--format", "torchvision", "--out", str(tmp_path / "r18.pth")])
    state = torch.load(tmp_path / "r18.pth", weights_only=True)
    net = torchvision.models.resnet18()
    result = net.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    for name, value in model.backbone_q.state_dict().items():
        assert torch.equal(net.state_dict()[name], value), name
    # Nothing from the key encoder or the heads: every tensor is the query backbone's.
    assert all(not torch.equal(state[n], p) for n, p in model.backbone_k.named_parameters())


def test_small_stem_backbone_loads_into_a_network_with_that_stem(tmp_path):
    model = pretrained(tmp_path / "s.ckpt", small_stem=True)
    export(str(tmp_path / "s.ckpt"), out=str(tmp_path / "s.pth"))
    net = torchvision.models.resnet18()
    net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    result = net.load_state_dict(torch.load(tmp_path / "s.pth", weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    assert torch.equal(net.conv1.weight, model.backbone_q.conv1.weight)


def test_detectron2_pickle_from_a_checkpoint(ckpt, tmp_path):
    path, model = ckpt
    out = export(str(path), format="detectron2", out=str(tmp_path / "r18.pkl"))
    with open(out, "rb") as f:
        obj = pickle.load(f)
    assert obj["__author__"] == "mls" and obj["matching_heuristics"] is True
    weights = obj["model"]
    q = model.backbone_q
    expected = {
        "stem.conv1.weight": q.conv1.weight,
        "stem.conv1.norm.running_var": q.bn1.running_var,
        "res2.0.conv1.norm.running_mean": q.layer1[0].bn1.running_mean,
        "res2.1.conv2.weight": q.layer1[1].conv2.weight,
        "res3.0.shortcut.weight": q.layer2[0].downsample[0].weight,
        "res3.0.shortcut.norm.bias": q.layer2[0].downsample[1].bias,
        "res5.1.conv2.norm.weight": q.layer4[1].bn2.weight,
    }
    for name, value in expected.items():
        assert isinstance(weights[name], np.ndarray)
        np.testing.assert_array_equal(weights[name], value.detach().numpy(), err_msg=name)
    # Exactly the query backbone's tensors: as many as torchvision's resnet18 has, less fc.
    assert len(weights) == len(torchvision.models.resnet18().state_dict()) - 2
    assert all(n.startswith(("stem.", "res2.", "res3.", "res4.", "res5.")) for n in weights)
    assert not any(word in n for n in weights for word in ("layer", "bn", "downsample", "fc", "head", "_k", "queue"))


def test_an_exported_torchvision_file_converts_to_detectron2(ckpt, tmp_path):
    path, model = ckpt
    export(str(path), out=str(tmp_path / "r18.pth"))
    export(str(tmp_path / "r18.pth"), format="detectron2", out=str(tmp_path / "r18.pkl"))
    with open(tmp_path / "r18.pkl", "rb") as f:
        weights = pickle.load(f)["model"]
    np.testing.assert_array_equal(weights["res4.1.conv1.weight"], model.backbone_q.layer3[1].conv1.weight.detach())


def test_detectron2_names_of_a_resnet50():
    state = {k: v for k, v in torchvision.models.resnet50().state_dict().items() if not k.startswith("fc.")}
    names = set(detectron2_checkpoint(state)["model"])
    for name in ("stem.conv1.weight", "stem.conv1.norm.weight", "res2.0.conv1.norm.running_mean",
                 "res2.0.shortcut.weight", "res2.0.shortcut.norm.running_var", "res3.3.conv2.norm.bias",
                 "res4.5.conv3.weight", "res5.2.conv3.weight", "res5.2.conv3.norm.weight"):
        assert name in names, name
    assert "res5.3.conv1.weight" not in names and len(names) == len(state)


def test_clear_errors_and_no_partial_file(ckpt, tmp_path):
    path, _ = ckpt
    with pytest.raises(ValueError, match="--format must be one of torchvision, detectron2"):
        export(str(path), format="onnx", out=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="does not exist"):
        export(str(path), out=str(tmp_path / "no" / "x.pth"))
    with pytest.raises(FileNotFoundError, match="checkpoint .* does not exist"):
        export(str(tmp_path / "missing.ckpt"), out=str(tmp_path / "x.pth"))

    def fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "y.pth", fail)
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_give_the_file_the_mode_of_a_new_file(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "out.txt", lambda tmp: open(tmp, "w").write("x"))
        assert path.stat().st_mode & 0o777 == 0o644  # readable by others, as open() would have made it
    finally:
        os.umask(old)
