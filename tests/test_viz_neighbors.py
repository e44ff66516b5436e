"""``mls visualize neighbors``: the grid, the rectangles at the stored boxes, the search, the errors."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import tiny_checkpoint
from mls import MLS
from mls.checkpoints.pretrained import save_pretrained
from mls.cli import main
from mls.data.sources import open_source
from mls.neighbor_search import Bank, nearest, queue_bank
from mls.viz.neighbors import Layout, neighbors

NUM_IMAGES, SIZE, TILE = 40, 32, 64  # 32 px images in 64 px tiles: every box edge lands on a whole pixel
DATA = dict(data=None, annotations=None, num_images=NUM_IMAGES, image_size=SIZE, seed=0)
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
RED, YELLOW = (255, 0, 0), (255, 255, 0)


def entry_index(e):
    return (7 * e) % NUM_IMAGES  # distinct images for the 24 entries


def entry_box(e):
    x0, y0 = (e % 4) / 8, ((e // 4) % 4) / 8
    return (x0, y0, x0 + 0.5, y0 + 0.5)


def tiny_model(**kwargs):
    torch.manual_seed(0)
    args = dict(arch="resnet18", small_stem=True, queue_size=32, topk=5, dim=16, store_g=True) | kwargs
    return MLS(**args), args


def checkpoint_with_queue(path, entries=24):
    """A checkpoint whose queue holds ``entries`` of the 32 rows, with known images and boxes."""
    def fill(model):
        e = torch.arange(entries)
        model.queue.push(g=F.normalize(torch.randn(entries, model.feature_dim), dim=1), z=torch.randn(entries, 16),
                         index=torch.tensor([entry_index(i) for i in e]),
                         box=torch.tensor([entry_box(i) for i in e], dtype=torch.float32))

    return tiny_checkpoint(path, DATA, prepare=fill, small_stem=True, queue_size=32, topk=5, dim=16, store_g=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    return path, checkpoint_with_queue(path)


def rectangle_pixels(box, origin, size=TILE, line=Layout().line):
    """The pixels of a box outline ``line`` px wide in a tile, computed by hand: edges on round(coord * size)."""
    x0, y0 = origin[0] + round(box[0] * size), origin[1] + round(box[1] * size)
    x1, y1 = origin[0] + round(box[2] * size) - 1, origin[1] + round(box[3] * size) - 1
    pixels = set()
    for t in range(line):
        pixels |= {(x, y0 + t) for x in range(x0, x1 + 1)} | {(x, y1 - t) for x in range(x0, x1 + 1)}
        pixels |= {(x0 + t, y) for y in range(y0, y1 + 1)} | {(x1 - t, y) for y in range(y0, y1 + 1)}
    return pixels


def tile_origin(row, col, layout=Layout(tile=TILE)):
    return (layout.gap + col * (TILE + layout.gap), layout.gap + row * (TILE + layout.gap + layout.caption))


def test_grid_and_rectangles_at_the_stored_boxes(ckpt, tmp_path):
    path, _ = ckpt
    out = tmp_path / "nn.png"
    found = neighbors(str(path), out=str(out), queries=3, k=4, seed=1, tile=TILE)
    fig = np.asarray(Image.open(out).convert("RGB"))
    layout = Layout(tile=TILE)
    # 3 rows of 1 query + 4 neighbours, each TILE px with the documented gaps and caption band.
    height, width = layout.gap + 3 * (TILE + layout.gap + layout.caption), layout.gap + 5 * (TILE + layout.gap)
    assert fig.shape[:2] == (height, width)
    assert len(found) == 3 and all(len(q.neighbors) == 4 for q in found)
    for r, q in enumerate(found):
        for x, y in rectangle_pixels(q.box, tile_origin(r, 0)):
            assert tuple(fig[y, x]) == RED, (r, x, y)
        for c, n in enumerate(q.neighbors, start=1):
            entry = [e for e in range(24) if entry_index(e) == n.index]
            assert len(entry) == 1, "every neighbour is a queue entry"
            for x, y in rectangle_pixels(entry_box(entry[0]), tile_origin(r, c)):
                assert tuple(fig[y, x]) == YELLOW, (r, c, x, y)


def test_neighbours_equal_a_brute_force_search_of_the_queue(ckpt, tmp_path):
    path, model = ckpt
    # Image 11 is in the queue (entry 13): its own entry must be skipped.
    found = neighbors(str(path), out=str(tmp_path / "nn.png"), query_index=[5, 11], k=6, tile=TILE)
    source = open_source(**DATA)
    backbone = model.backbone_q.eval()
    valid = model.queue.valid
    for q in found:
        # The query crop, embedded by hand: crop, bilinear resize, ImageNet normalisation, pooled feature.
        img = source.image(q.index)
        w, h = img.size
        left, top = round(q.box[0] * w), round(q.box[1] * h)
        crop = img.crop((left, top, round(q.box[2] * w), round(q.box[3] * h))).resize((SIZE, SIZE), Image.BILINEAR)
        x = (np.asarray(crop, dtype=np.float64) / 255 - MEAN) / STD
        with torch.no_grad():
            g = backbone(torch.tensor(x, dtype=torch.float32).permute(2, 0, 1)[None])[0]
        assert torch.allclose(q.g, g / g.norm(), atol=1e-4)
        scores = []
        for e in range(model.queue.size):
            if not valid[e] or int(model.queue["index"][e]) == q.index:  # never the query's own image
                continue
            entry = model.queue["g"][e]
            scores.append((float(g @ entry) / float(g.norm() * entry.norm()), int(model.queue["index"][e])))
        scores.sort(reverse=True)
        assert [n.index for n in q.neighbors] == [i for _, i in scores[:6]]
        assert [n.similarity for n in q.neighbors] == pytest.approx([s for s, _ in scores[:6]], abs=1e-5)


def test_nearest_orders_by_cosine_and_skips_the_query_image():
    torch.manual_seed(3)
    g, bank = torch.randn(4, 8), Bank(torch.randn(50, 8), torch.arange(50) % 10, torch.zeros(50, 4))
    own = torch.tensor([0, 3, 3, 9])
    sims, rows = nearest(g, bank, 5, exclude=own)
    for qi in range(4):
        cosine = {e: float(F.cosine_similarity(g[qi], bank.g[e], dim=0)) for e in range(50) if e % 10 != own[qi]}
        brute = sorted(cosine, key=lambda e: -cosine[e])[:5]
        assert rows[qi].tolist() == brute
        assert sims[qi].tolist() == pytest.approx([cosine[e] for e in brute], abs=1e-6)


def test_queue_bank_keeps_valid_entries_with_a_source():
    model, _ = tiny_model()
    model.queue.push(g=torch.randn(3, 512), z=torch.randn(3, 16), index=torch.tensor([4, -1, 9]),
                     box=torch.rand(3, 4))
    bank = queue_bank(model.queue)
    assert bank.index.tolist() == [4, 9]
    assert torch.allclose(bank.g.norm(dim=1), torch.ones(2))


def test_labels_mark_matches_and_give_the_precision(ckpt, tmp_path, capsys):
    path, _ = ckpt
    found = neighbors(str(path), out=str(tmp_path / "nn.png"), query_index=[2, 3, 8], k=5, tile=TILE)
    source = open_source(**DATA)
    expected = [bool(set(source.labels(q.index)) & set(source.labels(n.index))) for q in found for n in q.neighbors]
    assert [n.match for q in found for n in q.neighbors] == expected
    assert f"neighbour precision (shares a class with the query): {sum(expected) / len(expected):.3f}" \
        in capsys.readouterr().out


def test_dataset_bank_searches_fresh_crops_of_every_image(ckpt, tmp_path):
    path, _ = ckpt
    found = neighbors(str(path), out=str(tmp_path / "nn.png"), query_index=[0], k=NUM_IMAGES, bank="dataset",
                      tile=TILE)
    # One crop per image: every other image appears once among the neighbours, the query's own is skipped.
    assert sorted(n.index for n in found[0].neighbors) == list(range(1, NUM_IMAGES))
    found = neighbors(str(path), out=str(tmp_path / "nn.png"), query_index=[0], k=NUM_IMAGES, bank="dataset",
                      include_query_image=True, tile=TILE)
    assert sorted(n.index for n in found[0].neighbors) == list(range(NUM_IMAGES))


def test_command_line(ckpt, tmp_path):
    path, _ = ckpt
    out = tmp_path / "cli.png"
    main(["visualize", "neighbors", "--checkpoint", str(path), "--out", str(out), "--queries", "2", "--k", "3",
          "--tile", str(TILE), "--query-index", "[1,2]"])
    assert Image.open(out).size == (Layout().gap + 4 * (TILE + Layout().gap),
                                    Layout().gap + 2 * (TILE + Layout().gap + Layout().caption))


def test_error_without_queue_metadata(tmp_path):
    model, args = tiny_model()
    save_pretrained(tmp_path / "empty.ckpt", model, {"model": args, "data": DATA})
    with pytest.raises(ValueError, match="queue holds no entries with a known source image"):
        neighbors(str(tmp_path / "empty.ckpt"), out=str(tmp_path / "nn.png"))
    # Keys pushed without their source (index -1) do not count either.
    model.queue.push(g=torch.randn(4, 512), z=torch.randn(4, 16), index=torch.full((4,), -1),
                     box=torch.zeros(4, 4))
    save_pretrained(tmp_path / "anon.ckpt", model, {"model": args, "data": DATA})
    with pytest.raises(ValueError, match="queue holds no entries with a known source image"):
        neighbors(str(tmp_path / "anon.ckpt"), out=str(tmp_path / "nn.png"))
    assert not (tmp_path / "nn.png").exists()


def test_error_when_only_the_query_image_is_in_the_queue(tmp_path):
    model, args = tiny_model()
    model.queue.push(g=torch.randn(3, 512), z=torch.randn(3, 16), index=torch.full((3,), 4), box=torch.rand(3, 4))
    save_pretrained(tmp_path / "one.ckpt", model, {"model": args, "data": DATA})
    with pytest.raises(ValueError, match="no entries besides the query images"):
        neighbors(str(tmp_path / "one.ckpt"), out=str(tmp_path / "nn.png"), query_index=[4])
    found = neighbors(str(tmp_path / "one.ckpt"), out=str(tmp_path / "nn.png"), query_index=[4],
                      include_query_image=True)
    assert [n.index for n in found[0].neighbors] == [4, 4, 4]


def test_error_when_the_data_folder_is_not_the_checkpoints(ckpt, tmp_path):
    path, _ = ckpt
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(10):
        Image.new("RGB", (SIZE, SIZE), (i * 20, 0, 0)).save(folder / f"{i:03d}.png")
    with pytest.raises(ValueError, match=r"queue refers to image 3\d, but the data set .* has only 10 images"):
        neighbors(str(path), out=str(tmp_path / "nn.png"), data=str(folder))
    with pytest.raises(ValueError, match="--query-index refers to image 99"):
        neighbors(str(path), out=str(tmp_path / "nn.png"), query_index=[1, 99])


def test_error_for_an_unwritable_output_before_any_work(ckpt, tmp_path):
    path, _ = ckpt
    with pytest.raises(ValueError, match="does not exist"):
        neighbors(str(path), out=str(tmp_path / "no" / "such" / "nn.png"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        neighbors(str(path), out=str(tmp_path / "file" / "nn.png"))
    with pytest.raises(ValueError, match="is a folder"):
        neighbors(str(path), out=str(tmp_path))
    # Checked before the checkpoint is even read.
    with pytest.raises(ValueError, match="does not exist"):
        neighbors(str(tmp_path / "missing.ckpt"), out=str(tmp_path / "no" / "nn.png"))
