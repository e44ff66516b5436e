"""Loading real image files of every mode, image folders and COCO folders."""
import json
import pickle
import time

import numpy as np
import pytest
import torch
from PIL import Image

from mls.data import images
from mls.data.images import IMAGE_EXTENSIONS, ImageFolderSource, UnreadableImage, load_pixels, load_rgb
from mls.data.sources import open_source
from mls.data.synthetic import SyntheticScenes, write_coco

GREY = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1))  # 8 x 64 ramp 0..252


def as_array(path):
    img = load_rgb(path)
    assert img.mode == "RGB"
    out = np.asarray(img)
    assert out.dtype == np.uint8 and out.shape[2] == 3
    return out.astype(int)


def test_grey_and_grey_alpha_become_three_equal_channels(tmp_path):
    Image.fromarray(GREY, "L").save(tmp_path / "l.png")
    Image.fromarray(np.stack([GREY, 255 - GREY], -1), "LA").save(tmp_path / "la.png")
    for name in ("l.png", "la.png"):
        assert np.array_equal(as_array(tmp_path / name), np.repeat(GREY[..., None], 3, -1).astype(int))


def test_rgba_drops_alpha(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[..., 3] = np.arange(16).reshape(4, 4) * 16  # partly transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert (as_array(tmp_path / "rgba.png") == (10, 200, 30)).all()


def test_palette_with_transparency_keeps_palette_colours(tmp_path):
    img = Image.fromarray(np.array([[0, 1], [1, 2]], dtype=np.uint8), "P")
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    img.save(tmp_path / "p.png", transparency=1)
    assert "transparency" in Image.open(tmp_path / "p.png").info
    expected = np.array([[(255, 0, 0), (0, 255, 0)], [(0, 255, 0), (0, 0, 255)]])
    assert np.array_equal(as_array(tmp_path / "p.png"), expected)


def test_cmyk_is_converted_to_rgb(tmp_path):
    cmyk = np.zeros((4, 8, 4), dtype=np.uint8)
    cmyk[:, :4, 0] = 255  # pure cyan on the left, white (no ink) on the right
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.tif")
    rgb = as_array(tmp_path / "cmyk.tif")
    assert (rgb[:, :4] == (0, 255, 255)).all() and (rgb[:, 4:] == 255).all()


def test_one_bit_image_is_black_and_white(tmp_path):
    bits = np.array([[True, False], [False, True]])
    Image.fromarray(bits).save(tmp_path / "bits.png")
    assert Image.open(tmp_path / "bits.png").mode == "1"
    assert np.array_equal(as_array(tmp_path / "bits.png")[..., 0], bits * 255)


@pytest.mark.parametrize("name, dtype", [("ramp16.png", np.uint16), ("ramp16.tif", np.uint16),
                                         ("ramp32.tif", np.int32)])
def test_sixteen_bit_ramp_is_scaled_not_clipped(tmp_path, name, dtype):
    ramp = np.tile(np.linspace(0, 65535, 256).round(), (4, 1)).astype(dtype)
    Image.fromarray(ramp).save(tmp_path / name)
    assert Image.open(tmp_path / name).mode in ("I;16", "I")
    rgb = as_array(tmp_path / name)
    assert rgb[0, 0, 0] <= 1 and rgb[0, -1, 0] >= 254
    assert (np.diff(rgb[0, :, 0]) >= 0).all()
    # Not saturated: PIL's own convert("RGB") gives 255 almost everywhere.
    assert (rgb[0, :, 0] == 255).sum() <= 2
    assert np.abs(rgb[0, :, 0] - ramp[0] / 257).max() <= 1


def test_float_image_is_stretched_to_full_range(tmp_path):
    ramp = np.tile(np.linspace(-3.0, 5.0, 9, dtype=np.float32), (2, 1))
    Image.fromarray(ramp, "F").save(tmp_path / "f.tif")
    row = as_array(tmp_path / "f.tif")[0, :, 0]
    assert row[0] == 0 and row[-1] == 255 and row[4] in (127, 128)


def test_corrupt_files_raise_unreadable_image(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        tmp_path / "good.jpg", quality=90)
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.jpg").write_bytes(b"this is not an image" * 10)
    (tmp_path / "empty.png").write_bytes(b"")
    assert load_rgb(tmp_path / "good.jpg").size == (64, 64)
    for name in ("truncated.jpg", "garbage.jpg", "empty.png", "missing.png"):
        with pytest.raises(UnreadableImage, match=name) as caught:
            load_rgb(tmp_path / name)
        assert isinstance(caught.value, OSError)
        assert caught.value.path == str(tmp_path / name) and caught.value.reason
    copy = pickle.loads(pickle.dumps(caught.value))  # crosses data-loader worker processes intact
    assert isinstance(copy, UnreadableImage) and str(copy) == str(caught.value)


@pytest.fixture
def pil_calls(monkeypatch):
    """The files that ``load_pixels`` hands to PIL."""
    calls = []

    def counted(path):
        calls.append(path)
        return load_rgb(path)

    monkeypatch.setattr(images, "load_rgb", counted)
    return calls


def test_jpegs_are_decoded_without_pil_to_pils_pixels(tmp_path, pil_calls):
    scene = SyntheticScenes(1, 48, seed=0).image(0).resize((64, 40))
    scene.save(tmp_path / "rgb.jpg", quality=90)
    scene.convert("L").save(tmp_path / "grey.jpeg")
    for name in ("rgb.jpg", "grey.jpeg"):
        pixels = load_pixels(tmp_path / name)
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 40, 64)
        want = torch.from_numpy(np.array(load_rgb(tmp_path / name))).permute(2, 0, 1).int()
        # both use libjpeg-turbo; another libjpeg build may round its IDCT or upsampling differently: +-2
        assert (pixels.int() - want).abs().max() <= 2
    assert pil_calls == []
    assert torch.equal(load_pixels(tmp_path / "grey.jpeg")[0], load_pixels(tmp_path / "grey.jpeg")[2])


def test_what_the_fast_path_cannot_read_goes_through_pil(tmp_path, pil_calls):
    ramp = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "sixteen.png")  # 16-bit: scaled, not clipped (load_rgb)
    Image.fromarray(np.full((8, 8, 4), 60, np.uint8), "CMYK").save(tmp_path / "cmyk.jpg")
    palette = Image.fromarray(np.array([[0, 1], [1, 2]], dtype=np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    palette.save(tmp_path / "palette.png")
    palette.convert("RGB").save(tmp_path / "png_named.jpg", format="PNG")
    names = ["sixteen.png", "cmyk.jpg", "palette.png", "png_named.jpg"]
    for name in names:
        want = torch.from_numpy(np.array(load_rgb(tmp_path / name))).permute(2, 0, 1)
        assert torch.equal(load_pixels(tmp_path / name), want), name
    assert [p.name for p in pil_calls] == names  # each handed to PIL by load_pixels


def test_corrupt_jpegs_still_raise_unreadable_image(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        tmp_path / "good.jpg", quality=90)
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "header_only.jpg").write_bytes(data[:2] + b"not a jpeg" * 10)
    (tmp_path / "empty.jpg").write_bytes(b"")
    for name in ("truncated.jpg", "header_only.jpg", "empty.jpg", "missing.jpg"):
        with pytest.raises(UnreadableImage, match=name) as caught:
            load_pixels(tmp_path / name)
        assert caught.value.path == str(tmp_path / name)
    source = ImageFolderSource(tmp_path)
    assert source.pixels(source.files.index("good.jpg")).shape == (3, 64, 64)


def test_missing_or_empty_folder_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderSource(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"no image files .*\.jpg.*\.tiff"):
        ImageFolderSource(tmp_path)


def test_folder_is_scanned_recursively_sorted_and_case_insensitively(tmp_path):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / "a").mkdir()
    names = ["b/deep/z.PNG", "b/y.JpEg", "a/x.webp", "top.tif", "a/readme.md", "b/data.npy"]
    for name in names:
        Image.new("RGB", (3, 2), (9, 9, 9)).save(tmp_path / name, format="PNG")
    source = ImageFolderSource(tmp_path)
    assert source.files == ["a/x.webp", "b/deep/z.PNG", "b/y.JpEg", "top.tif"]
    assert len(source) == 4 and source.labels(0) is None and source.classes is None
    assert source.multi_hot() is None
    assert np.asarray(source.image(1)).tolist() == [[[9, 9, 9]] * 3] * 2


def test_scanning_does_not_open_the_files(tmp_path):
    for k in range(2000):
        (tmp_path / f"{k:06d}.jpg").touch()  # empty: opening any of them would fail
    start = time.perf_counter()
    source = ImageFolderSource(tmp_path)
    assert time.perf_counter() - start < 2.0  # a few milliseconds when the files are not opened
    assert len(source) == 2000 and source.files[0] == "000000.jpg"
    assert set(IMAGE_EXTENSIONS) >= {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def test_coco_annotations_give_contiguous_labels(tmp_path):
    for name in ("one.png", "two.png", "three.png", "unlisted.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    coco = {
        "images": [{"id": 11, "file_name": "two.png"}, {"id": 5, "file_name": "one.png"},
                   {"id": 8, "file_name": "three.png"}],
        "categories": [{"id": 10, "name": "kite"}, {"id": 3, "name": "car"}, {"id": 7, "name": "dog"}],
        "annotations": [{"id": k, "image_id": image_id, "category_id": category_id}
                        for k, (image_id, category_id) in enumerate([(11, 10), (11, 3), (11, 10), (5, 7)])],
    }
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    source = ImageFolderSource(tmp_path, annotations=str(tmp_path / "instances.json"))
    assert source.classes == ("car", "dog", "kite")  # ordered by category id 3, 7, 10
    assert source.files == ["two.png", "one.png", "three.png"]
    assert [source.labels(i) for i in range(3)] == [[0, 2], [1], []]
    assert torch.equal(source.multi_hot(), torch.tensor([[1.0, 0, 1], [0, 1, 0], [0, 0, 0]]))


def test_coco_annotations_naming_absent_files_are_refused(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "here.png")
    coco = {"images": [{"id": 1, "file_name": "here.png"}, {"id": 2, "file_name": "gone.png"}],
            "categories": [], "annotations": []}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    with pytest.raises(FileNotFoundError, match="gone.png"):
        ImageFolderSource(tmp_path, annotations=str(tmp_path / "instances.json"))
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="annotations, categories"):
        ImageFolderSource(tmp_path, annotations=str(tmp_path / "bad.json"))


def test_written_coco_split_reads_back_with_the_generator_labels(tmp_path):
    paths = write_coco(tmp_path, num_images=6, image_size=32, seed=4, splits=("val2017",))
    source = ImageFolderSource(tmp_path / "val2017", annotations=str(paths["val2017"]))
    scenes = SyntheticScenes(6, 32, seed=4)
    for i in range(6):
        assert source.labels(i) == sorted(scenes.labels(i))
        assert np.array_equal(np.asarray(source.image(i)), np.asarray(scenes.image(i)))
    assert torch.equal(source.multi_hot(), scenes.multi_hot())


def test_open_source_picks_synthetic_or_folder(tmp_path):
    for data in (None, "synthetic"):
        source = open_source(data, num_images=7, image_size=32, seed=1)
        assert isinstance(source, SyntheticScenes)
        assert (len(source), source.image(0).size, source.seed) == (7, (32, 32), 1)
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    assert isinstance(open_source(str(tmp_path)), ImageFolderSource)
