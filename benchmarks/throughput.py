"""Throughput of pretraining, piece by piece and end to end, with views made on the CPU or on the device.

All figures come from one run, so that their ratios compare like with like:
  (a) the workers' side, views/s per core (one process, one thread, as a data-loader worker runs):
      the CPU path (decode, crop, flip, jitter, grayscale, blur, normalise) and the device path's share
      (decode, crop, flip -> uint8), on the built-in synthetic scenes (drawn on the fly) and on a
      folder of JPEGs written here (synthetic scenes saved as JPEG, so that decoding is exercised),
      at 64 and 224 px; and the decoding alone, PIL (load_rgb) against decode_jpeg (load_pixels);
  (b) the device path's appearance steps on a batch, views/s on --device;
  (c) the model step alone, MoCo-v2 and MLS (benchmarks/step_overhead.py's step, random input);
  (d) images/s through Lightning's trainer.fit on the JPEG folder, views on the CPU or on the
      device (`mls pretrain --augment-on cpu|device`), MoCo-v2 and MLS, with the data and module that
      `mls pretrain` builds (a trainer without logs or checkpoints).
The views are MoCo-v2's (hue 0.1, grayscale 0.2, blur 0.5).

    python benchmarks/throughput.py                  # CPU: ResNet-18, 32 px, batch 16 (about 2 min)
    python benchmarks/throughput.py --device cuda    # ResNet-50, 224 px, bf16, channels-last,
                                                     # batch 256, K = 65,536 (under 8 min)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from mls.data.augment import MoCoV2View, TwoViewDataset
from mls.data.device_views import WorkerView, apply_appearance, collate_views
from mls.data.images import ImageFolderSource, load_pixels, load_rgb
from mls.data.synthetic import SyntheticScenes
from mls.train.data_order import SeededSamples
from mls.train.fit import build_data, build_module
from mls.train.settings import PretrainSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_overhead import fill, time_both  # noqa: E402  (the model step, shared with that benchmark)

MOCO_V2 = dict(hue=0.1, grayscale_p=0.2)
PRESETS = {  # what each device measures; any of it can be overridden on the command line
    "cpu": dict(arch="resnet18", image_size=32, batch_size=16, queue_size=1024, precision="fp32",
                channels_last=False, workers=1, seconds=2.0, steps=20, skip=4, jpegs=2048, threads=1),
    "cuda": dict(arch="resnet50", image_size=224, batch_size=256, queue_size=65536, precision="bf16",
                 channels_last=True, workers=max(1, min(16, (os.cpu_count() or 2) - 2)), seconds=3.0, steps=30,
                 skip=8, jpegs=2048, threads=0),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn, seconds: float, least: int = 3) -> float:
    """Calls of ``fn`` per second, called for about ``seconds`` (at least ``least`` times) after one warm-up call."""
    fn()
    calls, start = 0, time.perf_counter()
    while calls < least or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return calls / (time.perf_counter() - start)


def rates(fns: dict, seconds: float, rounds: int = 3) -> dict:
    """``rate`` of each of ``fns``, measured in turn ``rounds`` times (so that load changes hit all alike); medians."""
    measured = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            measured[name].append(rate(fn, seconds / rounds))
    return {name: statistics.median(values) for name, values in measured.items()}


def write_jpegs(root: Path, count: int, size: int) -> None:
    """``count`` synthetic scenes of ``size`` px as JPEG (quality 90), 512 distinct ones repeated."""
    scenes = SyntheticScenes(min(count, 512), size, seed=0)
    for i in range(count):
        path = root / f"{i:06d}.jpg"
        if i < len(scenes):
            scenes.image(i).save(path, quality=90)
        else:
            path.write_bytes((root / f"{i % len(scenes):06d}.jpg").read_bytes())


def worker_side(sources: dict, sizes: list[int], seconds: float) -> dict:
    """(a): views/s of one worker process for each source, view size and path; and decoding alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a data-loader worker
    out = {}
    try:
        for name, make_source in sources.items():
            for size in sizes:
                source = make_source(size)
                view = MoCoV2View(size, **MOCO_V2)
                paths = {"cpu": SeededSamples(TwoViewDataset(source, view), seed=0),
                         "device": SeededSamples(TwoViewDataset(source, WorkerView(view), tensors=True), seed=0)}
                counter = iter(range(10**9))
                samples = rates({path: lambda data=data: data[(0, next(counter) % len(source))]  # noqa: B023 (called in this loop)
                                 for path, data in paths.items()}, seconds)
                for path, per_sec in samples.items():
                    out[(name, size, path)] = 2 * per_sec  # two views per sample
        folder = sources["jpeg"](0)
        files = iter(range(10**9))
        decode = rates({"pil": lambda: load_rgb(folder.path(next(files) % len(folder))),
                        "jpeg": lambda: load_pixels(folder.path(next(files) % len(folder)))}, seconds)
        out["decode_pil"], out["decode_jpeg"] = decode["pil"], decode["jpeg"]
    finally:
        torch.set_num_threads(threads)
    return out


def device_side(device: torch.device, size: int, batch: int, seconds: float) -> tuple[float, int | None]:
    """(b): views/s of ``apply_appearance`` on a batch of ``batch`` uint8 views of ``size`` px on ``device``,
    and on a GPU the number of times one call waits for the device (CUDA's sync debug mode)."""
    scenes, worker = SyntheticScenes(64, size, seed=0), WorkerView(MoCoV2View(size, **MOCO_V2))
    images = [scenes.image(i) for i in range(len(scenes))]
    samples = []
    for i in range(batch):
        torch.manual_seed(i)
        v = worker(images[i % len(images)])
        samples.append({"view1": v.image, "appearance1": v.appearance})
    batch_on = move_data_to_device(collate_views(samples), device)  # as Lightning moves a batch

    def once():
        apply_appearance(batch_on["view1"], batch_on["appearance1"])
        sync(device)

    waits = None
    if device.type == "cuda":
        once()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                apply_appearance(batch_on["view1"], batch_on["appearance1"])
            finally:
                torch.cuda.set_sync_debug_mode("default")
        waits = sum("synchroniz" in str(w.message) for w in caught)
    return batch * rate(once, seconds), waits


class StepTimes(L.Callback):
    """Wall-clock time after each training step (the device synchronised at the ends of the timed span)."""

    def __init__(self, skip: int, steps: int):
        self.skip, self.steps, self.times = skip, steps, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if len(self.times) in (self.skip - 1, self.steps - 1):
            sync(module.device)
        self.times.append(time.perf_counter())

    def images_per_sec(self, batch_size: int) -> float:
        start, end = self.times[self.skip - 1], self.times[-1]
        return batch_size * (len(self.times) - self.skip) / (end - start)


def end_to_end(args, folder: str, method: str, augment_on: str) -> float:
    """(d): images/s through trainer.fit, after ``skip`` steps of warm-up. The data and the module are
    ``mls pretrain``'s own (``build_data``, ``build_module``); the trainer writes no logs or checkpoints."""
    device = torch.device(args.device)
    settings = PretrainSettings.resolve(dict(
        data=folder, arch=args.arch, method=method, queue_size=args.queue_size, topk=20, image_size=args.image_size,
        batch_size=args.batch_size, workers=args.workers, lr=0.03 * args.batch_size / 256, epochs=1,
        channels_last=args.channels_last, augment_on=augment_on, compile=args.compile, **MOCO_V2), preset="paper")
    data = build_data(settings)
    torch.manual_seed(0)
    module = build_module(settings, data, world_size=1)
    fill(module.model)  # every step does the full-size queue work
    timer = StepTimes(args.skip, args.steps)
    trainer = L.Trainer(
        accelerator=device.type, devices=[device.index or 0] if device.type == "cuda" else 1,
        precision={"fp32": "32", "bf16": "bf16-mixed", "fp16": "16-mixed"}[args.precision],
        max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, callbacks=[timer],
        benchmark=device.type == "cuda", default_root_dir=tempfile.mkdtemp(prefix="mls-throughput-"))
    trainer.fit(module, datamodule=data)
    return timer.images_per_sec(args.batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where the model and (b) run")
    for name, kind in (("arch", str), ("image-size", int), ("batch-size", int), ("queue-size", int),
                       ("workers", int), ("seconds", float), ("steps", int), ("skip", int), ("jpegs", int),
                       ("threads", int)):
        parser.add_argument(f"--{name}", type=kind, help="default: the device's preset")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--jpeg-size", type=int, default=224,
                        help="side of the JPEGs written for (a) and (d); photos of COCO or ImageNet are about 500")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224], help="view sizes of (a)")
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--compile", default=None, help="torch.compile backend of the encoders in (c) and (d), "
                                                        "as `mls pretrain --compile` (e.g. inductor)")
    args = parser.parse_args()
    device = torch.device(args.device)
    for key, value in PRESETS["cuda" if device.type == "cuda" else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.small_stem, args.queue_g_dtype, args.warmup = False, "float32", 2  # for step_overhead's step
    if args.threads:  # CPU: one thread per process, so that a busy machine slows each figure alike
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torchvision 0.29 deprecates its decoders
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # one trainer per figure: no banners
    setting = (f"{args.arch} {args.image_size}px batch {args.batch_size} K={args.queue_size} {args.precision}"
               f"{' channels-last' if args.channels_last else ''} on {device}"
               + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
               + f", {args.workers} workers, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print(f"setting: {setting}", flush=True)
    results: dict = {"setting": setting}
    with tempfile.TemporaryDirectory(prefix="mls-jpegs-") as root:
        start = time.perf_counter()
        write_jpegs(Path(root), args.jpegs, args.jpeg_size)
        print(f"wrote {args.jpegs} JPEGs of {args.jpeg_size} px in {time.perf_counter() - start:.0f} s", flush=True)

        sources = {"synthetic": lambda size: SyntheticScenes(256, size, seed=0),
                   "jpeg": lambda size: ImageFolderSource(root)}
        a = worker_side(sources, args.sizes, args.seconds)
        print(f"\n(a) worker side, views/s per core (JPEGs {args.jpeg_size} px; synthetic scenes drawn at the view size)")
        print(f"{'source':10} {'size':>5} {'cpu path':>9} {'device share':>13} {'ratio':>6}")
        for name in sources:
            for size in args.sizes:
                cpu, dev = a[(name, size, "cpu")], a[(name, size, "device")]
                print(f"{name:10} {size:5d} {cpu:9.0f} {dev:13.0f} {dev / cpu:5.1f}x")
        print(f"decoding alone, images/s per core: PIL to a PIL image {a['decode_pil']:.0f}, "
              f"decode_jpeg to a uint8 tensor {a['decode_jpeg']:.0f} ({a['decode_jpeg'] / a['decode_pil']:.2f}x)",
              flush=True)
        results["worker_views_per_sec"] = {f"{n}/{s}/{p}": v for (n, s, p), v in
                                           ((k, v) for k, v in a.items() if isinstance(k, tuple))}
        results["decode_per_sec"] = {"pil": a["decode_pil"], "decode_jpeg": a["decode_jpeg"]}

        b, waits = device_side(device, args.image_size, 2 * args.batch_size, args.seconds)
        print(f"\n(b) device side: appearance steps on {device}, {2 * args.batch_size} views of {args.image_size} px "
              f"at once: {b:.0f} views/s ({1000 * 2 * args.batch_size / b:.1f} ms per step's two views)"
              + ("" if waits is None else f"; waits for the GPU: {waits}"), flush=True)
        results["device_views_per_sec"] = b
        results["device_side_syncs"] = waits

        if device.type == "cuda":
            torch.cuda.set_device(device)  # step_overhead's step names the device by its type
        step_args = argparse.Namespace(**{**vars(args), "device": device.type, "steps": max(5, args.steps // 3)})
        c = {m: args.batch_size / statistics.median(t) for m, t in time_both(step_args).items()}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"\n(c) model step alone: MoCo-v2 {c['mocov2']:.0f} images/s, MLS {c['mls']:.0f} images/s "
              f"(rate of MLS / MoCo-v2: {c['mls'] / c['mocov2']:.3f})", flush=True)
        results["step_images_per_sec"] = c
        share = 2 * args.batch_size / b / (args.batch_size / c["mocov2"])
        print(f"    the device path's appearance steps add {100 * share:.1f}% to a MoCo-v2 step here")

        if not args.skip_end_to_end:
            d = {}
            for method in ("mocov2", "mls"):
                for augment_on in ("cpu", "device"):
                    d[(method, augment_on)] = end_to_end(args, root, method, augment_on)
                    print(f"    (d) {method} views on {augment_on}: {d[(method, augment_on)]:.1f} images/s", flush=True)
            print(f"\n(d) end to end, images/s through trainer.fit ({args.steps} steps, the first {args.skip} not timed)")
            print(f"{'method':8} {'step alone (c)':>15} {'views on cpu':>13} {'on device':>10} {'device/cpu':>11}")
            for m in ("mocov2", "mls"):
                cpu, dev = d[(m, "cpu")], d[(m, "device")]
                print(f"{m:8} {c[m]:15.1f} {cpu:13.1f} {dev:10.1f} {dev / cpu:10.2f}x")
            for on in ("cpu", "device"):
                print(f"MLS / MoCo-v2, views on {on}: {d[('mls', on)] / d[('mocov2', on)]:.3f}")
            results["end_to_end_images_per_sec"] = {f"{m}/{on}": v for (m, on), v in d.items()}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
