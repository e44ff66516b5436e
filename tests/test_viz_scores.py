"""``mls visualize scores`` (Fig. 3): the figure and its numbers, the scores computed directly, the errors."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mls import MLS
from mls.checkpoints.pretrained import save_pretrained
from mls.cli import main
from mls.data.sources import open_source
from mls.viz.scores import score_histograms

NUM_IMAGES, SIZE, ENTRIES = 20, 32, 12
DATA = dict(data=None, annotations=None, num_images=NUM_IMAGES, image_size=SIZE, seed=0)
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
SETTINGS = dict(arch="resnet18", small_stem=True, queue_size=16, topk=3, dim=16)


def entry_box(e):
    x0, y0 = (e % 4) / 8, ((e // 4) % 4) / 8
    return (x0, y0, x0 + 0.5, y0 + 0.5)


def checkpoint(path, **settings):
    """A tiny checkpoint whose queue holds ENTRIES of its 16 rows, each with a source image and a box."""
    torch.manual_seed(0)
    model = MLS(**{**SETTINGS, "store_g": True, **settings})
    entry = {"z": F.normalize(torch.randn(ENTRIES, 16), dim=1), "index": (3 * torch.arange(ENTRIES)) % NUM_IMAGES,
             "box": torch.tensor([entry_box(e) for e in range(ENTRIES)])}
    if "g" in model.queue:
        entry["g"] = F.normalize(torch.randn(ENTRIES, model.feature_dim), dim=1)
    model.queue.push(**entry)
    save_pretrained(path, model, {"data": DATA})
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    return path, checkpoint(path)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions run faster on one thread than on two when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def by_hand(model, crops):
    """ĝ and z of each (image, box) by hand: integer crop, bilinear resize, ImageNet normalisation, g / |g|."""
    batch = []
    for image, box in crops:
        w, h = image.size
        crop = image.crop(tuple(round(c * s) for c, s in zip(box, (w, h, w, h)))).resize((SIZE, SIZE), Image.BILINEAR)
        batch.append(torch.tensor((np.asarray(crop, dtype=np.float64) / 255 - MEAN) / STD, dtype=torch.float32))
    model.eval()
    with torch.no_grad():
        g = model.backbone_q(torch.stack(batch).permute(0, 3, 1, 2))
        z = model.head_q(g)
    return g / g.norm(dim=1, keepdim=True), z / z.norm(dim=1, keepdim=True)


def test_figure_has_two_panels_per_query_and_the_numbers_beside_it(ckpt, tmp_path):
    path, _ = ckpt
    out = tmp_path / "fig3.png"
    result = score_histograms(str(path), out=str(out), queries=2, bins=10)
    assert len(result.figure.axes) == 4
    assert [ax.get_title().split(": ")[1] for ax in result.figure.axes] == \
        ["backbone scores ĝ1·Q_gᵀ", "MLP scores z1·Q_zᵀ"] * 2
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (900, 600)
    record = json.loads((tmp_path / "fig3.json").read_text())
    assert record["k"] == 3 and len(record["bank"]["index"]) == ENTRIES and len(record["queries"]) == 2
    for q in record["queries"]:
        for net in ("before", "after"):
            for kind in ("backbone", "mlp"):
                scores = q["scores"][net][kind]
                assert len(scores) == ENTRIES
                assert q["threshold"][net][kind] == pytest.approx(sorted(scores)[-3])


def test_scores_equal_a_direct_computation(ckpt, tmp_path):
    path, model = ckpt
    result = score_histograms(str(path), out=str(tmp_path / "s.png"), query_index=[5], seed=4, bins=5)
    q = result.queries[0]
    source = open_source(**DATA)
    torch.manual_seed(4)
    random_net = MLS(model.config)  # "before": the same architecture initialised under --seed
    for net, name in ((model, "after"), (random_net, "before")):
        (g1,), (z1,) = by_hand(net, [(source.image(5), q.box)])
        bank_g, bank_z = by_hand(net, [(source.image(int(model.queue["index"][e])), model.queue["box"][e].tolist())
                                       for e in range(ENTRIES)])
        assert q.scores[name]["backbone"].tolist() == pytest.approx([float(g1 @ g) for g in bank_g], abs=1e-4)
        assert q.scores[name]["mlp"].tolist() == pytest.approx([float(z1 @ z) for z in bank_z], abs=1e-4)
    assert not torch.allclose(q.scores["before"]["backbone"], q.scores["after"]["backbone"])


def test_before_another_checkpoint_through_the_command_line(ckpt, tmp_path, capsys):
    path, _ = ckpt
    other = tmp_path / "other.ckpt"
    save_pretrained(other, MLS(**SETTINGS), {"data": DATA})  # any architecture: it embeds its own bank
    out = tmp_path / "cli.png"
    main(["visualize", "scores", "--checkpoint", str(path), "--before", str(other), "--out", str(out),
          "--query-index", "[2]", "--bins", "8"])
    assert Image.open(out).size == (900, 300)
    assert "against 12 crops of Q_g (k = 3)" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli.json").read_text())["before"] == str(other)


def test_a_queue_without_q_g_is_refused_in_one_line(tmp_path):
    checkpoint(tmp_path / "moco.ckpt", method="mocov2", store_g=None)
    with pytest.raises(ValueError, match=r"^the checkpoint's queue keeps no Q_g [^\n]*$"):
        score_histograms(str(tmp_path / "moco.ckpt"), out=str(tmp_path / "s.png"))
    with pytest.raises(ValueError, match="--checkpoint is required"):
        score_histograms(None, out=str(tmp_path / "s.png"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        score_histograms(str(tmp_path / "missing.ckpt"), out=str(tmp_path / "s.png"))
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "s.json").exists()
