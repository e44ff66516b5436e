"""The settings of a pretraining run besides the method's and the views': data, optimisation, schedule
of the extra loss, hardware and bookkeeping. Defaults are the main paper's COCO run (§4.1); presets
hold the departures of the CPU demo.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Literal

from mls.data.augment import ViewConfig
from mls.loggers import logger_setting, normalise_logger, project_setting, run_name_setting
from mls.method.extra_losses import EXTRA_LOSSES
from mls.method.settings import MLSConfig, check, check_probability, from_dict, setting
from mls.progress import Progress, check_progress, progress_setting


@dataclass(frozen=True)
class TrainConfig:
    """How a pretraining run trains: its data, optimiser, extra-loss schedule, devices and logs."""

    data: str | None = setting(None, "folder of images (searched recursively, e.g. COCO train2017/); "
                                     "null: the built-in synthetic scenes")
    annotations: str | None = setting(None, "optional COCO instances_*.json for DATA: its image list, and labels "
                                            "for the pseudo-label precision log")
    num_images: int = setting(2000, "number of synthetic scenes (without DATA)")
    batch_size: int = setting(256, "images per device and step")
    epochs: int = setting(800, "training epochs (§4.1: 400 or 800)")
    max_steps: int = setting(-1, "stop after this many steps (-1: run all epochs)")
    lr: float | None = setting(None, "SGD learning rate of the total batch; null: 0.3 x total batch / 256 (§4.1)")
    weight_decay: float = setting(1e-4, "SGD weight decay (§4.1)")
    sgd_momentum: float = setting(0.9, "SGD momentum")
    warmup_epochs: float = setting(0.0, "epochs of linear learning-rate warm-up before the cosine decay")
    extra_start_epoch: float = setting(0.0, "epoch from which the extra loss is added (before it: InfoNCE alone, "
                                            "the paper's other remedy for an unstable start)")
    extra_ramp_epochs: float = setting(0.0, "after extra_start_epoch, raise λ linearly from 0 over this many "
                                            "epochs (0: at once)")
    extra_after_full_queue: bool = setting(False, "add the extra loss only once the queue is full")
    workers: int | None = setting(None, "data-loading processes per device; null: the machine's cores, at most 8")
    devices: int | str = setting(1, 'devices per node (an int, or "auto")')
    num_nodes: int = setting(1, "number of nodes")
    strategy: str = setting("auto", "Lightning strategy; with several devices or nodes, DDP without buffer "
                                    "broadcasting")
    precision: Literal["32", "bf16-mixed", "16-mixed"] = setting(
        "32", "32, bf16-mixed or 16-mixed (losses, similarities and top-k stay in fp32)")
    sync_bn: bool = setting(False, "SyncBatchNorm in the query encoder across ranks")
    channels_last: bool = setting(False, "channels-last memory format (faster convolutions on recent GPUs)")
    augment_on: Literal["auto", "cpu", "device"] = setting(
        "auto", "where colour jitter, grayscale and blur are applied: cpu (in the data-loader workers, with PIL), "
                "device (to each batch on the training device, with kornia; the workers only decode, crop and "
                "flip), auto (device when training on a GPU, else cpu)")
    compile: str | None = setting(None, "torch.compile both encoders and heads with this backend: inductor (the "
                                        "generated kernels that make steps faster), or aot_eager to check that "
                                        "the model traces; null: not compiled")
    save_every: int = setting(1, "keep a checkpoint epochNNN.ckpt every this many epochs; 0: none (last.ckpt is "
                                  "always written)")
    max_failed_share: float = setting(0.05, "stop when more than this share of an epoch's images are unreadable")
    on_collapse: Literal["warn", "stop"] = setting(
        "warn", "when the health watch reports a condition (a collapsed embedding, or an extra loss pushing "
                "harder than InfoNCE; docs/study/watch): warn (in the log, the progress bar and the summary) "
                "or stop the run")
    monitor: str | None = setting(
        None, "labelled images to score the backbone on while it trains, by weighted k-NN as `mls eval knn` (cosine, "
              "k 20): scenes (built-in scenes held out from training), a folder of class folders (DIR/<class>/"
              "<image>), a folder holding VOCdevkit/VOC2007 (its trainval images) or a COCO instances_NAME.json "
              "(images in ../NAME/). A fixed sample of --monitor-images of them, split by --monitor-split into "
              "queries and the bank that classifies them; logs monitor/knn_top1 (class folders) or monitor/knn_map "
              "(multi-label), scored on rank zero, and keeps checkpoints/best.ckpt by it; null: none")
    monitor_every: int = setting(1, "score with --monitor every this many epochs; 0: never")
    monitor_images: int = setting(1000, "labelled images --monitor scores on: a fixed sample, the same for every "
                                        "run (the number of built-in scenes with scenes)")
    monitor_split: float = setting(0.5, "share of the --monitor images that are k-NN queries; the rest are the "
                                        "bank they are classified by")
    log_every: int = setting(10, "log every this many steps")
    logger: str = logger_setting("csv,tensorboard")
    project: str | None = project_setting()
    run_name: str | None = run_name_setting()
    progress: Progress = progress_setting()
    seed: int = setting(0, "seed of weights, data order and augmentation")

    def __post_init__(self):
        check(self.batch_size >= 1, "batch_size", f"must be positive, got {self.batch_size}")
        check(self.epochs >= 1, "epochs", f"must be positive, got {self.epochs}")
        check(self.lr is None or self.lr >= 0, "lr", f"must be >= 0, got {self.lr}")
        check(self.extra_start_epoch >= 0 and self.extra_ramp_epochs >= 0, "extra_start_epoch",
              f"and extra_ramp_epochs must be >= 0, got {self.extra_start_epoch} and {self.extra_ramp_epochs}")
        check(self.workers is None or self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")
        check(self.save_every >= 0, "save_every", f"must be >= 0 (0: only last.ckpt), got {self.save_every}")
        check_probability("max_failed_share", self.max_failed_share)
        check(self.monitor_every >= 0, "monitor_every", f"must be >= 0 (0: never), got {self.monitor_every}")
        check(self.monitor_images >= 2, "monitor_images", f"must be at least 2 (a query and a bank image), got "
                                                          f"{self.monitor_images}")
        check(0 < self.monitor_split < 1, "monitor_split", f"must be between 0 and 1, got {self.monitor_split}")
        check(self.on_collapse in ("warn", "stop"), "on_collapse", f"must be warn or stop, got {self.on_collapse!r}")
        normalise_logger(self)
        check_progress(self.progress)
        check(self.augment_on in ("auto", "cpu", "device"), "augment_on",
              f"must be auto, cpu or device, got {self.augment_on!r}")
        if self.compile is not None:
            import torch

            usual = [*torch.compiler.list_backends(), "aot_eager"]  # the full list adds torch's test backends
            check(self.compile in torch.compiler.list_backends(exclude_tags=()), "compile",
                  f"must be a torch.compile backend (e.g. {', '.join(usual)}), got {self.compile!r}")

    @property
    def views_on(self) -> str:
        """``augment_on`` with ``auto`` decided: the device where Lightning will train (a GPU if there is one)."""
        if self.augment_on != "auto":
            return self.augment_on
        import torch

        return "device" if torch.cuda.is_available() else "cpu"

    @property
    def loader_workers(self) -> int:
        return min(8, os.cpu_count() or 1) if self.workers is None else self.workers

    def learning_rate(self, total_batch: int) -> float:
        """SGD's rate for a total batch: ``lr``, or 0.3 x total batch / 256 (§4.1) when it is not set."""
        return 0.3 * total_batch / 256 if self.lr is None else self.lr


SETTINGS = (MLSConfig, ViewConfig, TrainConfig)
"""Every option of ``mls pretrain`` is a field of one of these."""

# The paper's settings with its extra loss changed for budgets shorter than the paper's: positive and negative
# terms averaged separately, at λ = 0.25, added from epoch 2 on. How it measured against MoCo-v2, and at which
# settings: the README's "Which to use" and docs/study. `--preset paper` runs the paper's setting as published.
RECOMMENDED = dict(extra_weight=0.25, bce_balanced=True, extra_start_epoch=2)

# The CPU demo: the recommended extra loss with a CPU's departures from the paper's settings
# (configs/demo_cpu.yaml holds the same values): ResNet-18 on 2,000 built-in scenes at 64 px, a few
# minutes on 2 cores. A short run wants a faster key momentum and a queue well below the number of
# images. The built-in classes are told apart by colour, so its views keep brightness, contrast and
# saturation jitter but neither hue shift nor grayscale. It scores itself on 256 held-out scenes each epoch
# (--monitor: a few % of its time).
PRESETS: dict[str, dict] = {
    "demo": dict(arch="resnet18", queue_size=1024, dim=128, momentum=0.99, **RECOMMENDED, image_size=64, hue=0.0,
                 grayscale_p=0.0, num_images=2000, batch_size=64, epochs=8, lr=0.06, workers=2, monitor="scenes",
                 monitor_images=256),
    "recommended": RECOMMENDED,
    "paper": {},
}
PRESET_HELP = {
    "demo": "the CPU demo on the built-in scenes (configs/demo_cpu.yaml), with the recommended extra loss",
    "recommended": "the paper's settings with the extra loss balanced (positive and negative terms averaged "
                   "apart), at λ 0.25, from epoch 2; where measured, level with MoCo-v2, not ahead: README, "
                   "Which to use",
    "paper": "the main paper's COCO settings as published: Eq. 9 at λ 0.5 from the first step",
}


@dataclass(frozen=True)
class PretrainSettings:
    """The three groups of settings of one run and the preset they started from."""

    model: MLSConfig
    view: ViewConfig
    train: TrainConfig
    preset: str

    @classmethod
    def resolve(cls, options: dict, preset: str = "auto") -> PretrainSettings:
        """Settings from the options given (``None``: not given), over a preset, over the defaults.

        ``auto`` takes the demo's preset on the built-in scenes and the recommended one with ``data``.
        """
        if preset == "auto":
            preset = "recommended" if options.get("data") not in (None, "synthetic") else "demo"
        check(preset in PRESETS, "preset", f"must be auto, {', '.join(PRESETS)}, got {preset!r}")
        values = {**PRESETS[preset], **{k: v for k, v in options.items() if v is not None}}
        unknown = set(values) - {f.name for group in SETTINGS for f in dataclasses.fields(group)}
        check(not unknown, "options", f"unknown settings {sorted(unknown)}")
        return cls(*(from_dict(group, values) for group in SETTINGS), preset)

    def preset_line(self) -> str:
        """The preset and what it holds, as a run's first line names it; for MoCo-v2, which has no extra loss,
        only what it takes from the preset (a preset's help describes its extra loss)."""
        if self.model.method == "mocov2":
            return f"preset '{self.preset}' (its backbone, views, queue and optimiser; MoCo-v2 has no extra loss)"
        return f"preset '{self.preset}' ({PRESET_HELP[self.preset]})"

    def summary(self) -> str:
        """The settings that decide what a run learns, as resolved: "MLS: ResNet-18, 64 px, D 1,024, k 20, λ 0.25
        (BCE balanced), extra loss from epoch 2"."""
        m, t = self.model, self.train
        arch = m.arch.replace("resnet", "ResNet-")
        text = f"{'MoCo-v2' if m.method == 'mocov2' else 'MLS'}: {arch}, {self.view.image_size} px, D {m.queue_size:,}"
        if m.method == "mocov2":
            return text
        loss = EXTRA_LOSSES[m.mls_loss].describe(m)
        start = "from the first step" if t.extra_start_epoch == 0 else f"from epoch {t.extra_start_epoch:g}"
        ramp = f", ramped over {t.extra_ramp_epochs:g} epochs" if t.extra_ramp_epochs else ""
        return f"{text}, k {m.topk}, λ {m.extra_weight:g} × {loss} {start}{ramp}"

    def values(self) -> dict:
        """Every setting by name, defaults included."""
        return {f.name: getattr(group, f.name) for group in (self.model, self.view, self.train)
                for f in dataclasses.fields(group)}
