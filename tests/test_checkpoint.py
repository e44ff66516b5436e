"""Checkpoints of mls 0.2 still load (export, eval, visualize); newer ones are refused in one line."""
import os
import subprocess
import sys

import pytest
import torch

import mls
from mls import MLS
from mls.checkpoint import load_pretrained
from mls.cli import main

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
