"""benchmarks/real_photos.py on a small stand-in for its two packages: drawings are left out, the held-out part
holds only held-out stamps and backgrounds, and both labelled parts read back through mls's VOC and COCO readers
with the classes of the objects pasted into each image."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mls.eval.datasets import load_dataset

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "real_photos.py"


@pytest.fixture(scope="module")
def real_photos():
    spec = importlib.util.spec_from_file_location("real_photos", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["real_photos"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def photo_stamp(path: Path, seed: int) -> None:
    """A noisy RGBA cut-out (thousands of colours, as a photograph has) with a transparent border."""
    rng = np.random.default_rng(seed)
    rgba = np.zeros((40, 30, 4), np.uint8)
    rgba[5:35, 5:25, :3] = rng.integers(0, 256, (30, 20, 3))
    rgba[5:35, 5:25, 3] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgba).save(path)


def make_sources(root: Path, real_photos) -> tuple[Path, Path]:
    stamps, backgrounds = root / "stamps", root / "backgrounds"
    seed = 0
    for label, prefixes in real_photos.CLASSES.items():
        folder = prefixes[0].rstrip("/")
        names = [f"{folder}/{label}{i}.png" for i in range(40)]
        held = [n for n in names if real_photos.held_out(n, 4)][:2]  # two held-out stamps a class, six others
        for name in held + [n for n in names if n not in held][:6]:
            seed += 1
            photo_stamp(stamps / name, seed)
    photo_stamp(stamps / "animals/birds/cartoon/drawn.png", 999)  # a drawing's folder
    flat = np.zeros((40, 30, 4), np.uint8)
    flat[5:35, 5:25] = (200, 30, 30, 255)
    Image.fromarray(flat).save(stamps / "animals/birds/flat.png")  # one colour: a drawing
    backgrounds.mkdir()
    for i in range(6):
        pixels = np.random.default_rng(100 + i).integers(0, 256, (80, 120, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(backgrounds / f"bg{i}.jpg")
    return stamps, backgrounds


def test_the_set_is_split_by_name_and_reads_back_as_voc_and_coco(tmp_path, real_photos):
    stamps, backgrounds = make_sources(tmp_path, real_photos)
    out = tmp_path / "photos"
    real_photos.main(["--out", str(out), "--stamps", str(stamps), "--backgrounds", str(backgrounds),
                      "--size", "48", "--pretrain", "20", "--probe", "30"])
    sources = json.loads((out / "sources.json").read_text())
    files = {s["file"] for s in sources["stamps"]}
    assert "animals/birds/cartoon/drawn.png" not in files and "animals/birds/flat.png" not in files
    assert len(files) == 8 * len(real_photos.CLASSES)
    held = {s["file"] for s in sources["stamps"] if s["part"] == "heldout"}
    assert held == {f for f in files if real_photos.held_out(f, 4)}  # by name, whatever the seed
    assert sum(b["part"] == "heldout" for b in sources["backgrounds"]) == real_photos.HELD_OUT_BACKGROUNDS
    assert len(list((out / "pretrain").glob("*.jpg"))) == 20

    for part in ("tuning", "heldout"):
        voc = load_dataset("voc07", str(out / part))
        assert sorted(voc.classes) == sorted(real_photos.CLASSES) and (len(voc.train), len(voc.test)) == (24, 6)
        image, target = voc.train[0]
        assert image.size == (48, 48) and 2 <= target.sum() <= 4  # 2-4 objects, maybe of one class
        coco = load_dataset("coco", str(out / part / "coco"))
        assert (len(coco.train), len(coco.test)) == (24, 6)
        # the same image has the same labels in both layouts (classes in the same order)
        order = [coco.classes.index(c) for c in voc.classes]
        assert coco.train[0][1][order].tolist() == target.tolist()
    pretrain = json.loads((out / "pretrain.json").read_text())
    assert len(pretrain["images"]) == 20 and all(a["bbox"][2] > 0 for a in pretrain["annotations"])


def test_a_folder_that_is_not_empty_is_refused(tmp_path, real_photos):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "x").write_text("")
    with pytest.raises(SystemExit, match="is not empty"):
        real_photos.main(["--out", str(tmp_path / "photos"), "--stamps", str(tmp_path), "--backgrounds", str(tmp_path)])
