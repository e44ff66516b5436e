"""MoCo-v2 views: the reported crop box and flip match the pixels; the two-view data set skips bad files."""
import colorsys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mls.data.augment import MoCoV2View, TwoViewDataset, blur_kernel_size
from mls.data.images import ImageFolderSource
from mls.data.synthetic import SyntheticScenes
from mls.method.backbones import IMAGENET_MEAN, IMAGENET_STD


def coordinate_image(width, height):
    """R = x and G = y, each scaled to 0..255 across the image."""
    x = np.arange(width) * 255 / (width - 1)
    y = np.arange(height) * 255 / (height - 1)
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = np.round(x)[None, :]
    pixels[..., 1] = np.round(y)[:, None]
    return Image.fromarray(pixels)


def to_pixels(view):
    """Undo the ImageNet normalisation: 0..255 values, H x W x 3."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((view * std + mean) * 255).permute(1, 2, 0).numpy()


def expected_ramp(start, length, source_size, view_size):
    """The 0..255 coordinate ramp at the centres of ``view_size`` pixels spanning [start, start + length)."""
    centres = start + (np.arange(view_size) + 0.5) * length / view_size - 0.5
    return centres * 255 / (source_size - 1)


@pytest.mark.parametrize("width, height", [(160, 120), (20, 16)])  # down- and up-sampled crops
@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_box_and_flip_match_the_view_pixels(width, height, flip_p):
    torch.manual_seed(0)
    size = 32
    view = MoCoV2View(size, flip_p=flip_p, jitter_p=0, grayscale_p=0, blur_p=0)
    source = coordinate_image(width, height)
    for _ in range(10):
        image, box, flipped = view(source)
        assert image.shape == (3, size, size) and box.dtype == torch.float32
        assert flipped == (flip_p == 1.0)
        x0, y0, x1, y1 = box.tolist()
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        pixels = to_pixels(image)
        red = pixels[..., 0].mean(0)  # one value per view column
        green = pixels[..., 1].mean(1)  # one value per view row
        want_red = expected_ramp(x0 * width, (x1 - x0) * width, width, size)
        if flipped:
            want_red = want_red[::-1]
        want_green = expected_ramp(y0 * height, (y1 - y0) * height, height, size)
        inner = slice(1, -1)  # the outermost pixels are filtered against the crop's edge
        # 1.25 grey levels: a box one source pixel off (1.6 levels at 160 px) would fail.
        assert np.abs(red[inner] - want_red[inner]).max() < 1.25
        assert np.abs(green[inner] - want_green[inner]).max() < 1.25


def test_crop_area_follows_scale():
    torch.manual_seed(1)
    view = MoCoV2View(8, scale=(0.2, 1.0), jitter_p=0, grayscale_p=0, blur_p=0)
    areas = []
    for _ in range(200):
        x0, y0, x1, y1 = view(Image.new("RGB", (100, 100))).box.tolist()
        areas.append((x1 - x0) * (y1 - y0))
    assert 0.19 <= min(areas) and max(areas) <= 1.0 and np.mean(areas) == pytest.approx(0.6, abs=0.08)


def test_flip_happens_about_half_the_time():
    torch.manual_seed(2)
    view = MoCoV2View(8, jitter_p=0, grayscale_p=0, blur_p=0)
    flips = sum(view(Image.new("RGB", (20, 20))).flipped for _ in range(300))
    assert 110 < flips < 190


def test_blur_kernel_is_odd_and_about_a_tenth_of_the_size():
    assert [blur_kernel_size(s) for s in (224, 96, 64, 32, 8)] == [23, 9, 7, 3, 3]


@pytest.mark.parametrize("size, widest", [(224, (5, 6)), (64, (1, 2))])
def test_blur_strength_scales_with_the_view(size, widest):
    # A black | white edge, blurred with sigma up to 2 px at 224 px (MoCo-v2) and 2 * 64 / 224 px at
    # 64 px. A Gaussian's 10-90% rise spans 2.56 sigma: at most 5.1 px, resp. 1.5 px.
    edge = np.zeros((size, size, 3), dtype=np.uint8)
    edge[:, size // 2:] = 255
    view = MoCoV2View(size, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0, jitter_p=0, grayscale_p=0, blur_p=1,
                      normalize=False)
    torch.manual_seed(0)
    widths = []
    for _ in range(40):
        row = view(Image.fromarray(edge)).image[0, size // 2].numpy()
        widths.append(int(((row > 0.1) & (row < 0.9)).sum()))
    assert widest[0] <= max(widths) <= widest[1]


def test_appearance_steps_change_pixels_only_when_on():
    torch.manual_seed(3)
    img = SyntheticScenes(1, 32, seed=0).image(0)
    plain = MoCoV2View(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0, jitter_p=0, grayscale_p=0, blur_p=0)
    grey = MoCoV2View(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0, jitter_p=0, grayscale_p=1, blur_p=0)
    expected = np.asarray(img).astype(np.float32)
    assert np.abs(to_pixels(plain(img).image) - expected).max() < 0.01  # full crop at full size: identity
    grey_pixels = to_pixels(grey(img).image)
    assert np.abs(grey_pixels[..., 0] - grey_pixels[..., 2]).max() < 0.01


def test_hue_zero_keeps_an_objects_hue_where_moco_v2s_jitter_moves_it():
    red = Image.new("RGB", (16, 16), (220, 30, 30))  # hue 0 degrees

    def largest_hue_shift(hue: float) -> float:
        view = MoCoV2View(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0, jitter_p=1, hue=hue, grayscale_p=0,
                          blur_p=0)
        shifts = []
        for seed in range(20):
            torch.manual_seed(seed)
            r, g, b = to_pixels(view(red).image).reshape(-1, 3).mean(0) / 255
            h = colorsys.rgb_to_hsv(r, g, b)[0]
            shifts.append(360 * min(h, 1 - h))
        return max(shifts)

    assert largest_hue_shift(0.0) < 2  # brightness, contrast and saturation still vary
    assert largest_hue_shift(0.1) > 15  # MoCo-v2: up to 36 degrees, red towards orange or magenta


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (5, 3), (1, 9)])
def test_tiny_images_still_give_full_size_views(size):
    image, box, _ = MoCoV2View(32)(Image.new("RGB", size, (200, 100, 50)))
    assert image.shape == (3, 32, 32) and torch.isfinite(image).all()
    assert (box >= 0).all() and (box <= 1).all() and (box[2:] > box[:2]).all()


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="blur_p"):
        MoCoV2View(32, blur_p=1.5)
    with pytest.raises(ValueError, match="scale"):
        MoCoV2View(32, scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="hue"):
        MoCoV2View(32, hue=0.6)


@pytest.fixture
def folder_with_a_corrupt_file(tmp_path):
    for k, colour in enumerate([(255, 0, 0), None, (0, 0, 255), None]):
        path = tmp_path / f"{k}.png"
        if colour is None:
            path.write_bytes(b"\x89PNG\r\n\x1a\n broken")
        else:
            Image.new("RGB", (12, 10), colour).save(path)
    return ImageFolderSource(tmp_path)  # files 0 ok, 1 corrupt, 2 ok, 3 corrupt


def test_two_view_dataset_skips_a_corrupt_file(folder_with_a_corrupt_file):
    view = MoCoV2View(16, jitter_p=0, grayscale_p=0, blur_p=0)
    data = TwoViewDataset(folder_with_a_corrupt_file, view)
    first, skipped, wrapped = data[0], data[1], data[3]
    assert (first["index"], first["failed"]) == (0, 0)
    assert (skipped["index"], skipped["failed"]) == (2, 1)
    assert (wrapped["index"], wrapped["failed"]) == (0, 1)  # past the end: back to the first image
    blue = to_pixels(skipped["view1"])  # the views show image 2, the blue one
    assert np.abs(blue - (0, 0, 255)).max() < 1
    assert skipped["view1"].shape == skipped["view2"].shape == (3, 16, 16)
    assert skipped["box2"].shape == (4,)


def test_failures_are_counted_through_loader_workers(folder_with_a_corrupt_file):
    data = TwoViewDataset(folder_with_a_corrupt_file, MoCoV2View(16))
    loader = DataLoader(data, batch_size=2, num_workers=2)
    batches = list(loader)
    assert sum(int(b["failed"].sum()) for b in batches) == 2
    assert torch.cat([b["index"] for b in batches]).tolist() == [0, 2, 2, 0]


def test_all_unreadable_is_an_error(tmp_path):
    for k in range(3):
        (tmp_path / f"{k}.jpg").write_bytes(b"nope")
    data = TwoViewDataset(ImageFolderSource(tmp_path), MoCoV2View(16), max_skips=5)
    with pytest.raises(RuntimeError, match="3 consecutive unreadable images from index 1"):
        data[1]
