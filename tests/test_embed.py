"""`mls embed`: every image of a folder embedded as an independent computation gives it, unreadable files skipped
and named, the output resumable after a kill -9 into the same bytes, and bad input refused in one line."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from conftest import tiny_checkpoint
from mls.checkpoints.pretrained import load_backbone
from mls.cli import main
from mls.data.images import load_rgb
from mls.data.synthetic import SyntheticScenes
from mls.embedding.commands import embed
from mls.embedding.store import open_embeddings
from mls.eval.transforms import test_transform as center_crop
from mls.viz.neighbors import Layout

SRC = Path(__file__).resolve().parents[1] / "src"
README = SRC.parent / "README.md"
FAST = dict(weights="random", arch="resnet18", small_stem=True, image_size=16, batch_size=4, chunk_size=6, workers=0)


def scene_folder(folder: Path, n: int, odd: bool = True) -> Path:
    """``n`` built-in scenes as PNGs, and (``odd``) a grayscale PNG, a CMYK JPEG and a file that is no image."""
    folder.mkdir(parents=True, exist_ok=True)
    scenes = SyntheticScenes(n, 32, seed=0)
    for i in range(n):
        scenes.image(i).save(folder / f"{i:04d}.png")
    if odd:
        Image.new("L", (40, 30), 90).save(folder / "gray.png")
        Image.new("CMYK", (30, 40), (10, 200, 30, 40)).save(folder / "cmyk.jpg")
        (folder / "broken.jpg").write_bytes(b"no image here")
    return folder


def reference(folder: Path, names: list[str]) -> torch.Tensor:
    """The embeddings computed directly: the seeded random ResNet-18, the eval crop, L2 normalisation."""
    torch.manual_seed(0)
    net, _, _ = load_backbone("random", "resnet18", True)
    net.eval()
    with torch.no_grad():
        x = torch.stack([center_crop(16)(load_rgb(folder / n)) for n in names])
        return F.normalize(net(x), dim=1)


def test_every_readable_image_is_embedded_and_the_unreadable_one_named(tmp_path, capsys):
    folder = scene_folder(tmp_path / "photos", 9)
    summary = embed(data=str(folder), out=str(tmp_path / "e"), **FAST)
    stored = open_embeddings(tmp_path / "e")
    expected = sorted([f"{i:04d}.png" for i in range(9)] + ["gray.png", "cmyk.jpg"])
    assert stored.paths == expected  # grayscale and CMYK are read as RGB, as pretraining reads them
    assert summary["embedded"] == 11 and [s[0] for s in summary["skipped"]] == ["broken.jpg"]
    assert "skipped 1 unreadable: broken.jpg" in capsys.readouterr().out
    assert (tmp_path / "e" / "skipped.csv").read_text().splitlines()[1].startswith("broken.jpg,")
    assert not (tmp_path / "e" / "chunks").exists()
    torch.testing.assert_close(stored.vectors, reference(folder, stored.paths), atol=1e-5, rtol=1e-4)


def test_npy_and_float16(tmp_path):
    folder = scene_folder(tmp_path / "photos", 5, odd=False)
    embed(data=str(folder), out=str(tmp_path / "a"), **FAST)
    embed(data=str(folder), out=str(tmp_path / "b"), format="npy", dtype="float16", normalize=False, **FAST)
    full = load_file(str(tmp_path / "a" / "embeddings.safetensors"))["embeddings"]
    half = np.load(tmp_path / "b" / "embeddings.npy")
    assert half.dtype == np.float16 and half.shape == tuple(full.shape)
    assert not np.allclose(np.linalg.norm(half.astype(np.float32), axis=1), 1, atol=1e-2)  # not normalised
    np.testing.assert_allclose(half / np.linalg.norm(half.astype(np.float32), axis=1, keepdims=True), full.numpy(),
                               atol=2e-3)


def test_other_settings_into_the_same_out_are_refused(tmp_path):
    folder = scene_folder(tmp_path / "photos", 4, odd=False)
    embed(data=str(folder), out=str(tmp_path / "e"), **FAST)
    assert embed(data=str(folder), out=str(tmp_path / "e"), **FAST) == {"complete": True}
    with pytest.raises(ValueError, match="another `mls embed` run, with other settings .*normalize: True there, "
                                         "False now"):
        embed(data=str(folder), out=str(tmp_path / "e"), **{**FAST, "normalize": False})


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        embed(data=str(tmp_path / "nowhere"), out=str(tmp_path / "e"), **FAST)
    with pytest.raises(ValueError, match="--data is required"):
        embed(out=str(tmp_path / "e"), **FAST)
    folder = scene_folder(tmp_path / "photos", 3, odd=False)
    tiny_checkpoint(tmp_path / "moco.ckpt")
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), **load_backbone("random", "resnet18")[0].state_dict()},
               tmp_path / "exported.pth")
    with pytest.raises(ValueError, match="--features projection needs a pretraining checkpoint"):
        embed(data=str(folder), out=str(tmp_path / "p"), weights=str(tmp_path / "exported.pth"),
              features="projection", workers=0)


def test_projection_features_of_a_checkpoint(tmp_path):
    folder = scene_folder(tmp_path / "photos", 3, odd=False)
    model = tiny_checkpoint(tmp_path / "run.ckpt", data={"image_size": 32})
    embed(data=str(folder), out=str(tmp_path / "e"), weights=str(tmp_path / "run.ckpt"), features="projection",
          workers=0)
    stored = open_embeddings(tmp_path / "e")
    assert stored.record["image_size"] == 32 and stored.vectors.shape == (3, 16)  # the checkpoint's size, dz 16
    with torch.no_grad():
        model.eval()
        x = torch.stack([center_crop(32)(load_rgb(folder / n)) for n in stored.paths])
        torch.testing.assert_close(stored.vectors, F.normalize(model.head_q(model.backbone_q(x)), dim=1),
                                   atol=1e-5, rtol=1e-4)


def test_an_exported_backbone_embeds_at_its_pretraining_size(tmp_path, capsys):
    """`mls export --format safetensors` records the pretraining size, so the exported backbone is embedded as its
    checkpoint is (32 px, not the 224 px of weights that record none), with the same vectors."""
    folder = scene_folder(tmp_path / "photos", 3, odd=False)
    model = tiny_checkpoint(tmp_path / "run.ckpt", data={"image_size": 32})
    main(["export", str(tmp_path / "run.ckpt"), "--format", "safetensors"])
    main(["export", str(tmp_path / "run.ckpt"), "--format", "torchvision"])
    capsys.readouterr()
    embed(data=str(folder), out=str(tmp_path / "exported"), weights=str(tmp_path / "run.safetensors"), workers=0)
    assert "32 px centre crops (the size the weights were pretrained at)" in capsys.readouterr().out
    embed(data=str(folder), out=str(tmp_path / "pickle"), weights=str(tmp_path / "run.torchvision.pth"), workers=0)
    assert "224 px centre crops (the default: the weights record no pretraining size" in capsys.readouterr().out
    stored = open_embeddings(tmp_path / "exported")
    assert stored.record["image_size"] == 32
    with torch.no_grad():
        x = torch.stack([center_crop(32)(load_rgb(folder / n)) for n in stored.paths])
        expected = F.normalize(model.eval().backbone_q(x).flatten(1), dim=1)
    torch.testing.assert_close(stored.vectors, expected, atol=1e-5, rtol=1e-4)


def run_embed(folder: Path, out: Path) -> subprocess.Popen:
    args = ["--data", str(folder), "--out", str(out)] + [f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mls.cli", "embed", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_a_killed_run_resumed_gives_the_bytes_of_an_uninterrupted_one(tmp_path):
    folder = scene_folder(tmp_path / "photos", 60)  # 63 files, 11 chunks of 6
    whole = run_embed(folder, tmp_path / "whole")
    assert whole.wait(timeout=900) == 0, whole.stdout.read()
    killed = run_embed(folder, tmp_path / "resumed")
    chunks, deadline = tmp_path / "resumed" / "chunks", time.time() + 600
    while len(list(chunks.glob("[0-9]*.safetensors"))) < 3 and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done_before = len(list(chunks.glob("[0-9]*.safetensors")))  # whole chunks, not the temporary file of the next
    assert 3 <= done_before < 11 and not (tmp_path / "resumed" / "paths.csv").exists()
    resumed = run_embed(folder, tmp_path / "resumed")
    printed = resumed.communicate(timeout=900)[0]
    assert resumed.returncode == 0, printed
    assert f"resumed: {done_before} of 11 chunks were already done" in printed
    for name in ("embeddings.safetensors", "paths.csv", "skipped.csv", "embed.json"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert json.loads((tmp_path / "whole" / "embed.json").read_text())["num_images"] == 63


@pytest.mark.slow
def test_the_readme_commands_on_a_synth_folder(tmp_path, capsys, monkeypatch):
    """README, "Using the features": mls synth, mls embed, mls search --all and --query, as written there."""
    commands = [line.split("#")[0].split()[1:] for line in README.read_text().split("## Using the features")[1].split("```")[1]
                .splitlines() if line.startswith("mls ")]
    assert [c[0] for c in commands] == ["synth", "embed", "search", "search"]
    commands[0][commands[0].index("1000")] = "24"  # fewer scenes, and a tiny network for the demo's backbone
    Path(tmp_path / "runs/demo/checkpoints").mkdir(parents=True)
    tiny_checkpoint(tmp_path / "runs/demo/checkpoints/last.ckpt", data={"image_size": 32})
    monkeypatch.chdir(tmp_path)
    for command in commands:
        main(command)
    printed = capsys.readouterr().out
    assert "24 of 24 images embedded" in printed
    table = Path("runs/scenes-similar/neighbors.csv").read_text().splitlines()
    assert table[0] == "query,rank,neighbor,cosine" and len(table) == 1 + 24 * 5
    first = Path("runs/scenes-query/neighbors.csv").read_text().splitlines()[1].split(",")
    assert first[:3] == ["scenes/000000000001.png", "1", "000000000001.png"] and float(first[3]) > 0.9999
    assert Image.open("runs/scenes-similar/neighbors.png").size == Layout().size(8, 6)  # 8 rows: a query, 5 neighbours
    assert Image.open("runs/scenes-query/neighbors.png").size == Layout().size(1, 6)
