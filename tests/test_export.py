"""``mls export``: the query backbone alone, loaded by the library each format is for (torchvision, timm,
safetensors, onnxruntime) and giving the pooled features of the mls backbone, or named as detectron2 expects."""
import copy
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision
from safetensors import safe_open
from torch import nn

import mls
from conftest import tiny_checkpoint
from mls.checkpoints.export import backbone_state, detectron2_checkpoint, export, save_backbone
from mls.checkpoints.pretrained import UnreadableCheckpoint, load_backbone
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


def pooled_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A network's output for ``x`` in inference mode (running statistics), its classifier left out."""
    net = copy.deepcopy(net).eval()
    if hasattr(net, "fc"):
        net.fc = nn.Identity()
    with torch.no_grad():
        return net(x)


IMAGES = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(5))


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
    # torchvision's network gives the mls backbone's pooled features (its running statistics included)
    torch.testing.assert_close(pooled_features(net, IMAGES), pooled_features(model.backbone_q, IMAGES),
                               rtol=0, atol=1e-5)


def test_safetensors_holds_torchvisions_names_and_says_what_it_is(ckpt, tmp_path):
    path, model = ckpt
    out = export(str(path), format="safetensors", out=str(tmp_path / "r18.safetensors"))
    with safe_open(out, framework="pt") as f:
        metadata, names = f.metadata(), set(f.keys())
        state = {name: f.get_tensor(name) for name in names}
    assert metadata["arch"] == "resnet18" and metadata["mls_version"] == mls.__version__
    assert metadata["source"] == str(path) and metadata["small_stem"] == "False"
    assert names == set(torchvision.models.resnet18().state_dict()) - {"fc.weight", "fc.bias"}
    assert not out.read_bytes().startswith((b"PK", b"\x80"))  # neither torch.save's zip nor a pickle
    net = torchvision.models.resnet18()
    assert sorted(net.load_state_dict(state, strict=False).missing_keys) == ["fc.bias", "fc.weight"]
    torch.testing.assert_close(pooled_features(net, IMAGES), pooled_features(model.backbone_q, IMAGES),
                               rtol=0, atol=1e-5)


def test_a_channels_last_backbone_is_written_as_safetensors(ckpt, tmp_path):
    _, model = ckpt
    backbone = copy.deepcopy(model.backbone_q).to(memory_format=torch.channels_last)
    assert not backbone.conv1.weight.is_contiguous()  # safetensors refuses such a tensor as it is
    out = save_backbone(backbone_state(backbone), tmp_path / "cl.safetensors", "safetensors", {"arch": "resnet18"})
    with safe_open(out, framework="pt") as f:
        assert torch.equal(f.get_tensor("conv1.weight"), model.backbone_q.conv1.weight)


def test_timm_builds_its_resnet_from_the_export(ckpt, tmp_path):
    timm = pytest.importorskip("timm")
    path, model = ckpt
    out = export(str(path), format="timm")
    assert out == path.with_name("last.timm.safetensors")
    net = timm.create_model("resnet18", pretrained=False)
    result = timm.models.load_checkpoint(net, str(out), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    expected = pooled_features(model.backbone_q, IMAGES)
    torch.testing.assert_close(pooled_features(net, IMAGES), expected, rtol=0, atol=1e-5)
    # as the README loads it: timm's own loader, with no classifier
    net = timm.create_model("resnet18", pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(out)))
    torch.testing.assert_close(pooled_features(net, IMAGES), expected, rtol=0, atol=1e-5)
    out.unlink()


@pytest.mark.slow
def test_onnx_gives_the_pooled_features_for_any_batch_and_image_size(ckpt, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    path, model = ckpt
    out = export(str(path), format="onnx", out=str(tmp_path / "r18.onnx"))
    assert os.listdir(tmp_path) == ["r18.onnx"]  # the weights inside, no external data file
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (images,), (features,) = session.get_inputs(), session.get_outputs()
    assert (images.name, features.name) == ("images", "features")
    assert isinstance(images.shape[0], str) and features.shape[1] == 512
    for x in (IMAGES, torch.randn(1, 3, 32, 40)):
        got = session.run(None, {"images": x.numpy()})[0]
        # float32 on both sides, summed in another order: max abs 1e-4
        np.testing.assert_allclose(got, pooled_features(model.backbone_q, x).numpy(), rtol=0, atol=1e-4)
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["arch"] == "resnet18" and props["mls_version"] == mls.__version__ and props["source"] == str(path)


def test_mls_reads_its_safetensors_export_back(tmp_path):
    model = pretrained(tmp_path / "s.ckpt", small_stem=True)
    out = export(str(tmp_path / "s.ckpt"), format="safetensors")
    assert out == tmp_path / "s.safetensors"
    backbone, dim, info = load_backbone(str(out))
    assert (info["arch"], info["small_stem"], dim, info["image_size"]) == ("resnet18", True, 512, 32)  # DATA's size
    torch.testing.assert_close(pooled_features(backbone, IMAGES), pooled_features(model.backbone_q, IMAGES),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="is the checkpoint itself"):
        export(str(out), format="safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UnreadableCheckpoint, match="bad.safetensors: it is not a readable safetensors file"):
        load_backbone(str(tmp_path / "bad.safetensors"))


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
    with pytest.raises(ValueError, match="--format must be one of torchvision, detectron2, safetensors, timm, onnx"):
        export(str(path), format="keras", out=str(tmp_path / "x"))
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
