"""Checkpoints of mls 0.2 to 0.5 still load (export, eval, visualize); newer ones are refused in one line."""
import os
import subprocess
import sys

import pytest
import torch

import mls
from mls import MLS
from mls.checkpoints.pretrained import backbone_info, load_pretrained
from mls.checkpoints.versions import upgrade
from mls.cli import main
from mls.neighbor_search import checkpoint_data

DATA = {"data": None, "annotations": None, "num_images": 40, "image_size": 32, "seed": 0}
# What `mls pretrain` of mls 0.2.0 stored as the model's hyper-parameters: its MLS keyword arguments,
# under their old names, beside its other hyper-parameters; no version.
OLD_MODEL = dict(arch="resnet18", method="mls", mls_loss="bce", select_from="g", topk=4, queue_size=24, dim=128,
                 tau=0.2, momentum=0.99, bce_weight=1.0, bce_tau=None, bce_balanced=True,
                 extra_after_full_queue=False, small_stem=True, shuffle_bn=True, queue_g_dtype="float32")


def old_checkpoint(path, model_hparams=OLD_MODEL, **extra) -> MLS:
    """A checkpoint laid out as mls 0.2.0 wrote it (Lightning's keys), made here from a model of the same shape."""
    torch.manual_seed(0)
    settings = {("extra_weight" if k == "bce_weight" else k): v for k, v in model_hparams.items()
                if k not in ("bce_tau", "extra_after_full_queue")}
    model = MLS(**{"dim": 128, "queue_size": 65536, **settings})
    model.queue.push(z=torch.nn.functional.normalize(torch.randn(24, 128), dim=1), index=torch.arange(24),
                     box=torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 24),
                     g=torch.nn.functional.normalize(torch.randn(24, 512), dim=1))
    hyper = {"model": dict(model_hparams), "lr": 0.06, "weight_decay": 1e-4, "sgd_momentum": 0.9, "total_steps": 10,
             "warmup_steps": 0, "extra_start_epoch": 2, "channels_last": False, "max_failed_share": 0.05,
             "data": DATA, **extra}
    state = {"model." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": hyper, "global_step": 10, "epoch": 1,
                "pytorch-lightning_version": "2.6.0"}, path)
    return model


def test_an_old_checkpoint_loads_with_its_old_setting_names(tmp_path):
    original = old_checkpoint(tmp_path / "old.ckpt")
    model, info = load_pretrained(tmp_path / "old.ckpt")
    assert info["model"]["extra_weight"] == 1.0 and info["model"]["dim"] == 128  # bce_weight -> extra_weight
    assert model.config.bce_balanced and model.config.momentum == 0.99
    for (name, a), b in zip(model.state_dict().items(), original.state_dict().values()):
        assert torch.equal(a, b), name


def test_an_old_checkpoint_without_some_settings_takes_the_old_defaults(tmp_path):
    """mls 0.2.0's MLS defaulted to dz 128, D 65,536: a checkpoint that did not store them means those."""
    partial = {k: v for k, v in OLD_MODEL.items() if k not in ("dim",)}
    old_checkpoint(tmp_path / "old.ckpt", partial)
    model, info = load_pretrained(tmp_path / "old.ckpt")
    assert info["model"]["dim"] == 128 and model.queue["z"].shape == (24, 128)


def test_export_eval_and_visualize_read_an_old_checkpoint(tmp_path):
    ckpt = tmp_path / "old.ckpt"
    old_checkpoint(ckpt)
    main(["export", str(ckpt), "--out", str(tmp_path / "r18.pth")])
    assert (tmp_path / "r18.pth").is_file()
    main(["eval", "knn", "--weights", str(ckpt), "--synthetic-images", "16", "--runs", "1", "--workers", "0",
          "--out", str(tmp_path / "knn")])
    assert (tmp_path / "knn" / "results.json").is_file()
    main(["visualize", "neighbors", "--checkpoint", str(ckpt), "--queries", "2", "--k", "3", "--tile", "32",
          "--out", str(tmp_path / "nn.png")])
    assert (tmp_path / "nn.png").is_file()


@pytest.mark.slow
def test_a_checkpoint_of_a_newer_mls_is_refused_in_one_line_naming_the_version(tmp_path):
    ckpt = tmp_path / "new.ckpt"
    old_checkpoint(ckpt, mls_version="9.0.0")
    with pytest.raises(ValueError, match=r"mls 9\.0\.0, newer than this mls " + mls.__version__.replace(".", r"\.")):
        load_pretrained(ckpt)
    proc = subprocess.run([sys.executable, "-m", "mls.cli", "export", str(ckpt), "--out", str(tmp_path / "x.pth")],
                          capture_output=True, text=True, env={**os.environ, "MLS_TRACEBACK": ""})
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "mls 9.0.0" in proc.stderr


# What `mls pretrain` of mls 0.3, 0.4 and 0.5 stored: every MLSConfig field under today's names, the
# training and view settings in dicts of their own, the version; the data's fingerprint from 0.4 on.
MODEL_0_3 = dict(arch="resnet18", small_stem=True, method="mls", mls_loss="bce", select_from="g", logits_from="z",
                 topk=4, queue_size=24, dim=32, tau=0.2, momentum=0.99, extra_weight=0.25, extra_tau=None,
                 bce_balanced=True, logit_bias="none", mask_positives=False, shuffle_bn=True,
                 queue_g_dtype="float32", store_g=None)
TRAIN_0_3 = dict(data=None, annotations=None, num_images=40, batch_size=8, epochs=2, max_steps=-1, lr=None,
                 weight_decay=1e-4, sgd_momentum=0.9, warmup_epochs=0.0, extra_start_epoch=1.0,
                 extra_ramp_epochs=0.0, extra_after_full_queue=False, workers=0, seed=0)
VIEW_0_3 = dict(image_size=32, min_scale=0.2, hue=0.0, grayscale_p=0.0, blur=True)


def checkpoint_0_3_to_0_5(path, version: str, fingerprint: str | None, **model_overrides) -> MLS:
    """A checkpoint laid out as mls ``version`` (0.3-0.5) wrote it, made here from a model of the same shape."""
    torch.manual_seed(0)
    settings = {**MODEL_0_3, **model_overrides}
    model = MLS(**settings)
    model.queue.push(z=torch.nn.functional.normalize(torch.randn(24, 32), dim=1), index=torch.arange(24),
                     box=torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 24),
                     g=torch.nn.functional.normalize(torch.randn(24, 512), dim=1))
    data = {**DATA, **({"fingerprint": fingerprint} if fingerprint else {})}
    hyper = {"model": settings, "train": TRAIN_0_3, "view": VIEW_0_3, "steps_per_epoch": 5, "total_batch": 8,
             "data": data, "mls_version": version}
    state = {"model." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": hyper, "global_step": 10, "epoch": 1,
                "pytorch-lightning_version": "2.6.0"}, path)
    return model


@pytest.mark.parametrize("version, fingerprint, overrides", [
    ("0.3.0", None, {}),  # before the data's fingerprint
    ("0.4.0", "built-in scenes: 40 of 32 px, seed 0", {"logit_bias": "learned"}),
    ("0.5.0", "built-in scenes: 40 of 32 px, seed 0", {"mls_loss": "knn", "store_g": True}),
])
def test_checkpoints_of_0_3_to_0_5_load_with_their_settings_and_weights(tmp_path, version, fingerprint, overrides):
    path = tmp_path / f"{version}.ckpt"
    original = checkpoint_0_3_to_0_5(path, version, fingerprint, **overrides)
    model, info = load_pretrained(path)
    assert info["model"] == {**MODEL_0_3, **overrides} and info["mls_version"] == version
    assert info["train"] == TRAIN_0_3 and info["view"] == VIEW_0_3
    for (name, a), b in zip(model.state_dict().items(), original.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert backbone_info(str(path)) == {"arch": "resnet18", "small_stem": True, "image_size": 32}
    source, _ = checkpoint_data(info, str(path))  # its own data: the same fingerprint, or none to compare
    assert len(source) == 40


def test_the_data_fingerprint_is_compared_from_0_4_and_its_absence_in_0_3_is_not_refused(tmp_path):
    from PIL import Image

    other = tmp_path / "other"
    other.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (80 * i, 0, 0)).save(other / f"{i}.png")
    checkpoint_0_3_to_0_5(tmp_path / "new.ckpt", "0.4.0", "built-in scenes: 40 of 32 px, seed 0")
    _, info = load_pretrained(tmp_path / "new.ckpt")
    with pytest.raises(ValueError, match="is not the data set"):
        checkpoint_data(info, str(tmp_path / "new.ckpt"), data=str(other))
    checkpoint_0_3_to_0_5(tmp_path / "old.ckpt", "0.3.0", None)
    _, info = load_pretrained(tmp_path / "old.ckpt")
    source, _ = checkpoint_data(info, str(tmp_path / "old.ckpt"), data=str(other))  # nothing to compare
    assert len(source) == 3


def test_upgrade_translates_0_2_settings_leaves_later_ones_and_changes_nothing_twice():
    written = {"state_dict": {}, "hyper_parameters": {"model": {"bce_weight": 0.7, "bce_tau": 0.1, "topk": 4},
                                                      "lr": 0.06}}
    upgraded = upgrade(written)
    assert upgraded["hyper_parameters"]["model"] == {"extra_weight": 0.7, "extra_tau": 0.1, "topk": 4,
                                                     "queue_size": 65536, "dim": 128, "momentum": 0.999}
    assert upgraded["hyper_parameters"]["lr"] == 0.06 and "mls_version" not in upgraded["hyper_parameters"]
    assert written["hyper_parameters"]["model"] == {"bce_weight": 0.7, "bce_tau": 0.1, "topk": 4}  # left as it was
    assert upgrade(upgraded) == upgraded
    later = {"state_dict": {}, "hyper_parameters": {"model": dict(MODEL_0_3), "mls_version": "0.5.0"}}
    assert upgrade(later) == later  # no defaults of 0.2 slipped in
    with pytest.raises(ValueError, match=r"x\.ckpt was written by mls 9\.1\.0, newer"):
        upgrade({"hyper_parameters": {"model": {}, "mls_version": "9.1.0"}}, "x.ckpt")
