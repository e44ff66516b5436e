"""``mls pretrain``: settings checked up front, then a Lightning ``Trainer`` run."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from mls.checkpoint import atomic_save
from mls.data.augment import MoCoV2View
from mls.train.data import PretrainData
from mls.train.module import PretrainModule

CHECKPOINTS = "checkpoints"
INTERRUPTED = "interrupted"
# Lightning warnings that do not apply to these runs: `resolve_resume` picks the checkpoint (with
# OnExceptionCheckpoint, Lightning goes looking for a "last" one on every fresh fit), and the sampler
# goes on mid-epoch from the restored step (mls.train.data), which Lightning cannot see.
_NOT_APPLICABLE = (
    r"`\.fit\(ckpt_path=None\)` was called without a model",
    r'\.fit\(ckpt_path="last"\) is set, but there is no last checkpoint',
    r"You're resuming from a checkpoint that ended before the epoch ended",
)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints go to a temporary file that is renamed over the old one: a crash never leaves half a file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        atomic_save(checkpoint, path)


def _progress(path: Path) -> tuple[int, float]:
    """(training step, modification time) of a checkpoint, read without loading its tensors."""
    step = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("global_step", -1)
    return step, path.stat().st_mtime


def resolve_resume(resume: str | None, out: Path) -> str | None:
    """``auto``: whichever of ``last.ckpt`` and ``interrupted.ckpt`` in ``out`` got furthest (none: start
    afresh); else the path given. A run that failed before it restored its checkpoint writes an
    ``interrupted.ckpt`` of step 0, which must not win over an older ``last.ckpt``."""
    if resume is None:
        return None
    if resume == "auto":
        found = [p for p in (out / CHECKPOINTS / "last.ckpt", out / CHECKPOINTS / f"{INTERRUPTED}.ckpt") if p.is_file()]
        return str(max(found, key=_progress)) if found else None
    if not Path(resume).is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {resume}")
    return resume


def check_settings(n_images: int, batch_size: int, world_size: int, queue_size: int, epochs: int) -> None:
    """Settings that cannot work, said in plain words before anything starts."""
    if batch_size < 1 or epochs < 1:
        raise ValueError(f"batch_size and epochs must be positive, got {batch_size} and {epochs}")
    if batch_size * world_size > n_images:
        raise ValueError(f"batch_size={batch_size} x {world_size} ranks is larger than the data set "
                         f"({n_images} images): no full batch can be made")
    if queue_size >= n_images:
        raise ValueError(
            f"queue_size={queue_size} is not below the number of images ({n_images}): the queue would hold "
            "keys of the very image being queried, which InfoNCE then treats as negatives. "
            "Use a smaller --queue-size (MoCo: well below the data set) or more images.")


def pretrain(
    data: str | None = None,
    annotations: str | None = None,
    out: str = "runs/demo",
    method: Literal["mocov2", "mls"] = "mls",
    mls_loss: Literal["bce", "bce-pos", "knn"] = "bce",
    select_from: Literal["g", "z"] = "g",
    topk: int = 20,
    queue_size: int = 1024,
    dim: int = 128,
    tau: float = 0.2,
    momentum: float = 0.99,
    bce_weight: float = 1.0,
    bce_tau: float | None = None,
    bce_balanced: bool = True,
    extra_start_epoch: int = 2,
    extra_after_full_queue: bool = False,
    arch: str = "resnet18",
    small_stem: bool = False,
    image_size: int = 64,
    num_images: int = 2000,
    blur: bool = True,
    min_scale: float = 0.2,
    hue: float = 0.0,
    grayscale_p: float = 0.0,
    batch_size: int = 64,
    epochs: int = 8,
    max_steps: int = -1,
    lr: float | None = 0.06,
    weight_decay: float = 1e-4,
    sgd_momentum: float = 0.9,
    warmup_epochs: float = 0.0,
    workers: int = 2,
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: Literal["32", "bf16-mixed", "16-mixed"] = "32",
    sync_bn: bool = False,
    shuffle_bn: bool = True,
    channels_last: bool = False,
    queue_g_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    save_every: int = 1,
    resume: str | None = None,
    max_failed_share: float = 0.05,
    log_every: int = 10,
    seed: int = 0,
) -> Path:
    """Pretrain a backbone with MLS (or MoCo-v2) and write checkpoints and logs under OUT.

    Defaults are the CPU demo (configs/demo_cpu.yaml): ResNet-18 on 2,000 built-in synthetic
    scenes at 64 px, with the short-run settings that made the demo learn (balanced BCE added
    from epoch 2, lr 0.06). configs/mls_coco_r50_800ep.yaml holds the paper's settings: plain
    Eq. 9 from the start.

    Args:
        data: folder of images (searched recursively, e.g. COCO train2017/); empty: the built-in synthetic scenes.
        annotations: optional COCO instances_*.json for DATA: its image list, and labels for the pseudo-label precision log.
        out: output folder: checkpoints/, tensorboard/ and csv/ logs.
        method: mocov2 (InfoNCE only) or mls (InfoNCE + bce_weight x extra loss).
        mls_loss: extra loss (Table 6): bce (Eq. 9, MLS), bce-pos (Eq. 15), knn (k-NN softmax, Eq. 10).
        select_from: pseudo-labels from the backbone queue Q_g (g, MLS) or the embedding queue Q_z (z, Table 7).
        topk: positive pseudo-labels per query, k (Table 8).
        queue_size: dictionary size D; must stay below the number of images.
        dim: embedding size dz.
        tau: InfoNCE temperature.
        momentum: key-encoder momentum m (0.999 for long runs; 0.99 for short ones).
        bce_weight: weight λ of the extra loss.
        bce_tau: temperature of the extra loss; empty: tau.
        bce_balanced: average the positive and negative BCE terms separately, then sum.
        extra_start_epoch: epoch from which the extra loss is added.
        extra_after_full_queue: add the extra loss only once the queue is full.
        arch: torchvision backbone: resnet18, resnet34, resnet50 or resnet101.
        small_stem: 3x3 stem without max-pool, for images of 32-96 px.
        image_size: side of the random-resized crops.
        num_images: number of synthetic scenes (without DATA).
        blur: Gaussian blur in the augmentation (MoCo-v2: p = 0.5, sigma 0.1-2 px at 224 px, scaled with
            the image size).
        min_scale: smallest crop area of RandomResizedCrop, as a share of the image (MoCo-v2: 0.2).
        hue: largest hue shift of the colour jitter, as a share of the colour circle (MoCo-v2: 0.1). The
            built-in scenes' classes differ by hue, orange and yellow by 23 degrees, so the demo keeps it at 0.
        grayscale_p: probability of a grayscale view (MoCo-v2: 0.2; the demo: 0, for the same reason).
        batch_size: images per device and step.
        epochs: training epochs.
        max_steps: stop after this many steps (-1: run all epochs).
        lr: SGD learning rate of the total batch; null: 0.03 x total batch / 256 (MoCo's scaling).
        weight_decay: SGD weight decay.
        sgd_momentum: SGD momentum.
        warmup_epochs: epochs of linear learning-rate warm-up before the cosine decay.
        workers: data-loading processes per device.
        devices: devices per node (an int, or "auto").
        num_nodes: number of nodes.
        strategy: Lightning strategy; with several devices or nodes, DDP without buffer broadcasting.
        precision: 32, bf16-mixed or 16-mixed (losses, similarities and top-k stay in fp32).
        sync_bn: SyncBatchNorm in the query encoder across ranks.
        shuffle_bn: MoCo's shuffle-BN for the key encoder across ranks.
        channels_last: channels-last memory format (faster convolutions on recent GPUs).
        queue_g_dtype: storage type of Q_g (bfloat16/float16 halve its memory).
        save_every: write a checkpoint every this many epochs (last.ckpt is always written).
        resume: checkpoint to resume from, or "auto": the one in OUT that got furthest (a fresh run into an OUT holding checkpoints is refused).
        max_failed_share: stop when more than this share of an epoch's images are unreadable.
        log_every: log every this many steps.
        seed: seed of weights, data order and augmentation.
    """
    out_dir = Path(out)
    L.seed_everything(seed, workers=True, verbose=False)
    view = MoCoV2View(image_size, scale=(min_scale, 1.0), hue=hue, grayscale_p=grayscale_p, blur_p=0.5 if blur else 0.0)
    datamodule = PretrainData(data, annotations, num_images, image_size, batch_size, workers, seed, view)
    ckpt_path = resolve_resume(resume, out_dir)
    written = sorted(p.name for p in (out_dir / CHECKPOINTS).glob("*.ckpt"))
    if written and ckpt_path is None:
        raise FileExistsError(f"{out_dir} already holds the checkpoints of a run ({', '.join(written[:4])}): "
                              "pass --resume auto to continue it, or choose another --out")

    multi = devices not in (1, "1") or num_nodes > 1 or strategy == "ddp"
    trainer = L.Trainer(
        accelerator="auto",
        devices=devices,
        num_nodes=num_nodes,
        strategy=DDPStrategy(broadcast_buffers=False) if multi and strategy in ("auto", "ddp") else strategy,
        precision=precision,
        sync_batchnorm=sync_bn,
        max_epochs=epochs,
        max_steps=max_steps,
        use_distributed_sampler=False,
        log_every_n_steps=log_every,
        plugins=[AtomicCheckpointIO()],
        callbacks=[
            ModelCheckpoint(out_dir / CHECKPOINTS, filename="epoch{epoch:03d}", auto_insert_metric_name=False,
                            every_n_epochs=save_every, save_top_k=-1, save_last=True),
            OnExceptionCheckpoint(out_dir / CHECKPOINTS, filename=INTERRUPTED),
            TQDMProgressBar(refresh_rate=max(1, log_every // 2)),
        ],
        # CSV: one version_N folder per (resumed) run, since Lightning's CSV writer starts its file anew
        logger=[TensorBoardLogger(out_dir, name="tensorboard", version=""), CSVLogger(out_dir, name="csv")],
        enable_model_summary=False,
        benchmark=torch.cuda.is_available(),
        default_root_dir=out_dir,
    )
    n_images = len(datamodule.source)
    check_settings(n_images, batch_size, trainer.world_size, queue_size, epochs)
    steps_per_epoch = n_images // trainer.world_size // batch_size
    model = dict(arch=arch, method=method, mls_loss=mls_loss, select_from=select_from, topk=topk,
                 queue_size=queue_size, dim=dim, tau=tau, momentum=momentum, bce_weight=bce_weight, bce_tau=bce_tau,
                 bce_balanced=bce_balanced, extra_after_full_queue=extra_after_full_queue, small_stem=small_stem,
                 shuffle_bn=shuffle_bn, queue_g_dtype=queue_g_dtype)
    module = PretrainModule(
        model,
        lr=lr if lr is not None else 0.03 * batch_size * trainer.world_size / 256,
        weight_decay=weight_decay,
        sgd_momentum=sgd_momentum,
        total_steps=steps_per_epoch * epochs,
        warmup_steps=round(warmup_epochs * steps_per_epoch),
        extra_start_epoch=extra_start_epoch,
        channels_last=channels_last,
        max_failed_share=max_failed_share,
        data=datamodule.describe(),
        labels=datamodule.labels(),
    )
    with warnings.catch_warnings():
        for message in _NOT_APPLICABLE:
            warnings.filterwarnings("ignore", message=message)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    last = out_dir / CHECKPOINTS / "last.ckpt"
    rank_zero_info(f"checkpoint: {last}\nlogs: {trainer.loggers[1].log_dir}/metrics.csv and {out_dir / 'tensorboard'} "
                   f"(mls plot {out_dir / 'csv'} --out curves.png; tensorboard --logdir {out_dir / 'tensorboard'})")
    return last
