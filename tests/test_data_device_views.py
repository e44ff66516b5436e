"""Views made on the device: the same draws as the CPU path, applied per sample as torchvision would."""
import warnings

import lightning as L
import pytest
import torch
from torchvision.transforms.v2 import functional as F

from conftest import pretrain_module
from mls.data.augment import MoCoV2View, TwoViewDataset, blur_kernel_size, blur_sigma_range
from mls.data.device_views import WorkerView, apply_appearance, collate_views, draw_appearance
from mls.data.images import ImageFolderSource
from mls.data.synthetic import SyntheticScenes
from mls.method.backbones import IMAGENET_MEAN, IMAGENET_STD
from mls.train.data_module import PretrainData
from mls.train.data_order import SeededSamples
from mls.train.fit import build_data
from mls.train.settings import PretrainSettings, TrainConfig

MOCO_V2 = dict(hue=0.1, grayscale_p=0.2)  # MoCo-v2's view; the defaults keep jitter_p 0.8, blur_p 0.5
DEMO = dict(hue=0.0, grayscale_p=0.0)  # the demo's: no hue draw at all


def device_batch(view, images, seeds):
    """The device path's views of ``images``, each sample drawn under its seed: (views, batch)."""
    worker, samples = WorkerView(view), []
    for img, seed in zip(images, seeds):
        torch.manual_seed(seed)
        v = worker(img)
        samples.append({"view1": v.image, "appearance1": v.appearance})
    batch = collate_views(samples)
    return apply_appearance(batch["view1"], batch["appearance1"], normalize=view.normalize), batch


@pytest.mark.parametrize("settings", [MOCO_V2, DEMO])
def test_the_worker_draws_what_the_cpu_view_draws(settings):
    view, worker = MoCoV2View(24, **settings), WorkerView(MoCoV2View(24, **settings))
    image = SyntheticScenes(1, 40, seed=0).image(0)
    pixels = F.pil_to_tensor(image)
    for seed in range(30):
        torch.manual_seed(seed)
        cpu = [view(image), view(image)]  # two views in a row, as a sample makes them
        cpu_state = torch.get_rng_state()
        for source in (image, pixels):  # the PIL image of the synthetic scenes, the tensor of the JPEG path
            torch.manual_seed(seed)
            dev = [worker(source), worker(source)]
            for c, d in zip(cpu, dev):
                assert torch.equal(c.box, d.box) and c.flipped == d.flipped
                assert d.image.dtype == torch.uint8 and d.image.shape == (3, 24, 24)
            # the same number of draws from the same stream: the appearance parameters are the CPU path's too
            assert torch.equal(torch.get_rng_state(), cpu_state)


def test_crop_boxes_and_draws_match_through_the_data_set_and_loader_workers(tmp_path):
    scenes = SyntheticScenes(12, 48, seed=3)
    for i in range(len(scenes)):
        scenes.image(i).save(tmp_path / f"{i:02d}.jpg", quality=90)
    source, view = ImageFolderSource(tmp_path), MoCoV2View(16, **MOCO_V2)
    cpu = SeededSamples(TwoViewDataset(source, view), seed=5)
    dev = SeededSamples(TwoViewDataset(source, WorkerView(view), tensors=True), seed=5)
    keys = [(2, i) for i in range(len(scenes))]
    loader = torch.utils.data.DataLoader(dev, batch_size=6, sampler=keys, num_workers=2, collate_fn=collate_views)
    in_workers = list(loader)
    for b, batch in enumerate(in_workers):
        for row, key in enumerate(keys[6 * b: 6 * b + 6]):
            c, d = cpu[key], dev[key]
            assert torch.equal(c["box2"], d["box2"]) and torch.equal(batch["box2"][row], d["box2"])
            for n in (1, 2):
                for name, value in d[f"appearance{n}"].items():  # reproducible whatever the worker count
                    assert torch.equal(batch[f"appearance{n}"][name][row], value)
                assert torch.equal(batch[f"view{n}"][row], d[f"view{n}"])


def test_drawn_parameters_follow_moco_v2s_distributions():
    # 800 draws; shares within 4 binomial standard deviations (0.8: +-0.057, 0.5: +-0.071, 0.2: +-0.057)
    view, n = MoCoV2View(32, **MOCO_V2), 800
    torch.manual_seed(0)
    draws = [draw_appearance(view) for _ in range(n)]
    p = {k: torch.stack([d[k] for d in draws]) for k in draws[0]}
    for name, want in (("jitter", 0.8), ("gray", 0.2), ("blur", 0.5)):
        share = p[name].float().mean().item()
        assert abs(share - want) < 4 * (want * (1 - want) / n) ** 0.5, (name, share)
    jittered = p["factors"][p["jitter"]]
    for j in range(3):  # brightness, contrast, saturation: uniform in [0.6, 1.4], a quarter of the draws per quarter
        f = jittered[:, j]
        assert 0.6 <= f.min() and f.max() <= 1.4
        counts = torch.histc(f, bins=4, min=0.6, max=1.4)
        assert ((counts / len(f) - 0.25).abs() < 4 * (0.25 * 0.75 / len(f)) ** 0.5).all(), counts
    hue = jittered[:, 3]
    assert hue.abs().max() <= 0.1 and hue.min() < -0.09 and hue.max() > 0.09
    assert (p["factors"][~p["jitter"]] == torch.tensor([1.0, 1.0, 1.0, 0.0])).all()  # no jitter: identity
    first = torch.bincount(p["order"][p["jitter"], 0], minlength=4) / len(jittered)  # each op leads a quarter of the time
    assert ((first - 0.25).abs() < 4 * (0.25 * 0.75 / len(jittered)) ** 0.5).all(), first
    assert (p["order"].sort(1).values == torch.arange(4)).all()  # always a permutation
    low, high = blur_sigma_range(32)
    sigma = p["sigma"][p["blur"]]
    assert low <= sigma.min() and sigma.max() <= high and (p["sigma"][~p["blur"]] == 0).all()


def torchvision_reference(crop: torch.Tensor, params: dict, row: int) -> torch.Tensor:
    """One sample through torchvision's own float kernels, step by step: the independent computation."""
    x = crop.float() / 255
    factors, kernels = params["factors"][row].tolist(), (F.adjust_brightness, F.adjust_contrast,
                                                          F.adjust_saturation, F.adjust_hue)
    if params["jitter"][row]:
        for j in params["order"][row].tolist():
            if factors[j] != (0.0 if j == 3 else 1.0):
                x = kernels[j](x, factors[j])
    if params["gray"][row]:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if params["blur"][row]:
        sigma = float(params["sigma"][row])
        x = F.gaussian_blur(x, [blur_kernel_size(x.shape[-1])] * 2, [sigma, sigma])
    return x


def test_each_sample_gets_its_own_steps_in_its_own_order_as_torchvision_applies_them():
    view = MoCoV2View(24, hue=0.1, jitter_p=0.7, grayscale_p=0.3, normalize=False)
    scenes = SyntheticScenes(48, 40, seed=1)
    out, batch = device_batch(view, [scenes.image(i) for i in range(48)], range(48))
    params = batch["appearance1"]
    assert len({tuple(o) for o in params["order"][params["jitter"]].tolist()}) > 10  # many orders in one batch
    for row in range(48):
        want = torchvision_reference(batch["view1"][row], params, row)
        # float kernels on both sides; kornia's and torchvision's HSV round trips differ by float rounding
        assert (out[row] - want).abs().max() < 2e-3, row
    untouched = ~(params["jitter"] | params["gray"] | params["blur"])
    assert untouched.any() and torch.equal(out[untouched], batch["view1"][untouched].float() / 255)


def test_views_match_the_cpu_path_over_a_batch_of_scenes():
    # 200 views of 100 scenes under the same seeds: per channel, |mean difference| and |std difference|
    # below 0.05 in normalised units, and each pixel on average within 0.04 (2.3 grey levels).
    # The CPU path's PIL jitter truncates to whole grey levels after each of its steps (about -0.5
    # level each), the device path works in float: the device views are about 1.3 levels brighter.
    view, scenes = MoCoV2View(24, **MOCO_V2), SyntheticScenes(100, 32, seed=2)
    images = [scenes.image(i) for i in range(100)] * 2
    seeds = list(range(100)) + list(range(1000, 1100))
    cpu = []
    for img, seed in zip(images, seeds):
        torch.manual_seed(seed)
        cpu.append(view(img).image)
    cpu = torch.stack(cpu)
    dev, _ = device_batch(view, images, seeds)
    assert dev.shape == cpu.shape and dev.dtype == torch.float32
    assert ((dev.mean((0, 2, 3)) - cpu.mean((0, 2, 3))).abs() < 0.05).all()
    assert ((dev.std((0, 2, 3)) - cpu.std((0, 2, 3))).abs() < 0.05).all()
    assert (dev - cpu).abs().mean() < 0.04


def test_normalisation_is_imagenets():
    crops = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    params = {"jitter": torch.zeros(4, dtype=torch.bool), "order": torch.arange(4).repeat(4, 1),
              "factors": torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(4, 1), "gray": torch.zeros(4, dtype=torch.bool),
              "blur": torch.zeros(4, dtype=torch.bool), "sigma": torch.zeros(4)}  # not planned: worked out inside
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    assert torch.allclose(apply_appearance(crops, params), (crops.float() / 255 - mean) / std, atol=1e-6)


class FirstBatch(L.Callback):
    """Keeps the first batch as the training step receives it."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 0:
            self.views = batch["view1"].clone()


def test_pretrain_data_makes_the_views_on_the_device_and_the_module_trains(tmp_path):
    settings = dict(num_images=16, image_size=32, batch_size=8, workers=0, seed=0, view=MoCoV2View(32, **MOCO_V2))
    torch.manual_seed(0)
    module = pretrain_module(dict(arch="resnet18", queue_size=8, topk=2, dim=16, method="mls"),
                             dict(epochs=1, batch_size=8), steps_per_epoch=2, total_batch=8)
    seen = FirstBatch()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[seen],
                        use_distributed_sampler=False, default_root_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=PretrainData(**settings, augment_on="device"))
    assert not [w for w in caught if "on_after_batch_transfer" in str(w.message)]  # one hook, no warning
    assert trainer.global_step == 1 and torch.isfinite(trainer.callback_metrics["train/loss"])
    # the training step saw float views: the CPU path's, up to the rounding of its PIL jitter
    want = next(iter(PretrainData(**settings).train_dataloader()))["view1"]
    assert seen.views.dtype == torch.float32 and seen.views.shape == want.shape
    assert (seen.views - want).abs().mean() < 0.04


def test_unknown_augment_on_is_refused():
    with pytest.raises(ValueError, match="augment_on"):
        PretrainData(num_images=8, image_size=16, augment_on="gpu")


@pytest.mark.parametrize("augment_on, gpu, expected", [("auto", False, "cpu"), ("auto", True, "device"),
                                                       ("cpu", True, "cpu"), ("device", False, "device")])
def test_mls_pretrain_makes_the_views_where_augment_on_says(monkeypatch, augment_on, gpu, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    settings = PretrainSettings.resolve({"augment_on": augment_on, "num_images": 8, "image_size": 16})
    data = build_data(settings)
    assert data.settings["augment_on"] == expected
    sample = data.dataset[(0, 0)]
    assert sample["view1"].dtype == (torch.uint8 if expected == "device" else torch.float32)
    assert ("appearance1" in sample) == (expected == "device")


def test_an_unknown_compile_backend_is_refused_in_plain_words():
    with pytest.raises(ValueError, match="compile.*torch.compile backend.*inductor"):
        TrainConfig(compile="fast")
