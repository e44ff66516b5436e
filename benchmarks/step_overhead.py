"""Cost of MLS over MoCo-v2: time and peak memory of one training step, same model and batch; the cost
of the health measures (``mls.method.health``), which a run computes every ``--log-every`` steps; and the
cost of a ``--monitor`` pass (``mls.train.monitor``) against an epoch of MLS steps.

The steps (forward, backward, SGD update) are timed in one process, alternating, and the
ratio of medians is printed, so that machine noise hits all alike. Memory is the CUDA
allocator's peak on a GPU, and the memory held between steps on a CPU.

    python benchmarks/step_overhead.py                      # CPU: ResNet-18, 64 px, D = 16,384
    python benchmarks/step_overhead.py --device cuda --arch resnet50 --image-size 224 \
        --batch-size 256 --queue-size 65536 --precision bf16
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mls import MLS
from mls.train.monitor import backbone_features, knn_score

METHODS = {"mocov2": dict(method="mocov2"), "mls": dict(method="mls")}


def build(args, method: str) -> tuple[MLS, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = MLS(arch=args.arch, queue_size=args.queue_size, topk=20, small_stem=args.small_stem,
                queue_g_dtype=args.queue_g_dtype, **METHODS[method]).to(args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if getattr(args, "compile", None):  # as `mls pretrain --compile BACKEND`
        model.compile_encoders(args.compile)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.SGD(params, lr=0.03, momentum=0.9, weight_decay=1e-4)


def make_step(args, model, optimizer):
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=args.device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    meta = {"index": torch.arange(args.batch_size, device=args.device),
            "box": torch.rand(args.batch_size, 4, device=args.device)}
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]

    def step():
        with torch.autocast(args.device, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x, x, meta)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()

    return step


def median_seconds(measure, device: str, repeats: int, warmup: int) -> float:
    """Median wall time of ``measure()`` over ``repeats`` calls after ``warmup`` calls, the device synchronised."""
    for _ in range(warmup):
        measure()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        measure()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def fill(model) -> None:
    """Fill the queue with random unit rows, so that every timed step does the full-size work."""
    queue = model.queue
    queue.push(**{name: torch.nn.functional.normalize(torch.randn(queue[name].shape, device=queue[name].device), dim=-1)
                  for name in queue.names})


def time_both(args) -> dict[str, list[float]]:
    """Step times of MoCo-v2 and MLS, alternating."""
    runs = {m: build(args, m) for m in METHODS}
    steps = {m: make_step(args, *runs[m]) for m in METHODS}
    for m in METHODS:
        fill(runs[m][0])
        for _ in range(args.warmup):
            steps[m]()
    times = {m: [] for m in METHODS}
    for _ in range(args.steps):
        for m in METHODS:  # alternate, so drift hits both
            sync(args.device)
            start = time.perf_counter()
            steps[m]()
            sync(args.device)
            times[m].append(time.perf_counter() - start)
    return times


@torch.no_grad()
def time_health(args, repeats: int = 20) -> float:
    """Median seconds of ``MLS.health`` on a full queue, as a run computes it at each log step: the spread of
    Q_z and Q_g and the forces on z1 of a batch of queries (random unit vectors and their top-k in Q_g)."""
    model, _ = build(args, "mls")
    fill(model)
    n, queue = args.batch_size, model.queue
    q = torch.nn.functional.normalize(torch.randn(n, queue["z"].shape[1], device=args.device), dim=1)
    k = torch.nn.functional.normalize(q + 0.5 * torch.randn_like(q), dim=1)
    l_neg = q @ queue["z"].T
    labels = torch.zeros_like(l_neg).scatter_(1, l_neg.topk(model.config.topk, dim=1).indices, 1.0)
    measure = lambda: model.health(q, k, l_neg, labels, queue.valid, queue.valid)  # noqa: E731
    return median_seconds(measure, args.device, repeats, warmup=3)


def time_monitor(args, repeats: int = 3) -> float:
    """Median seconds of one ``--monitor`` pass as a run makes it at an epoch's end (``mls.train.monitor``): the
    pooled features of ``--monitor-images`` images (random uint8, decoded once as the run keeps them) by the query
    backbone in eval mode, then the weighted k-NN score of half of them against the other half."""
    model, _ = build(args, "mls")
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.monitor_images, 3, args.image_size, args.image_size), dtype=torch.uint8,
                           generator=generator)
    targets = torch.randint(0, 8, (args.monitor_images,), generator=generator)
    device = torch.device(args.device)

    def measure() -> float:
        features = backbone_features(model.backbone_q, images, device, args.batch_size)
        return knn_score(features, targets, args.monitor_images // 2, 8, multilabel=False)

    return median_seconds(measure, args.device, repeats, warmup=1)


def peak_memory(args, method: str) -> float:
    """Peak memory of one step, in MiB: the CUDA allocator's peak on a GPU; on a CPU, where torch
    keeps no peak, the memory held between steps (weights, gradients, optimiser state, queues)."""
    model, opt = build(args, method)
    step = make_step(args, model, opt)
    fill(model)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    step()
    if args.device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    tensors = [*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters() if p.grad is not None),
               *(t for state in opt.state.values() for t in state.values() if torch.is_tensor(t))]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--small-stem", action="store_true")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--queue-size", type=int, default=16384)
    parser.add_argument("--queue-g-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", default=None, help="torch.compile backend of the encoders (e.g. inductor)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--log-every", type=int, default=10, help="steps between health measurements (a run's --log-every)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--monitor-images", type=int, default=256, help="images of a --monitor pass (the demo's)")
    parser.add_argument("--epoch-images", type=int, default=2000, help="images of an epoch (the demo's)")
    args = parser.parse_args()
    times = time_both(args)
    med = {m: statistics.median(t) for m, t in times.items()}
    mem = {m: peak_memory(args, m) for m in METHODS}
    setting = (f"{args.arch} {args.image_size}px batch {args.batch_size} D={args.queue_size} "
               f"{args.precision} Q_g {args.queue_g_dtype} on {args.device}"
               + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    print(f"setting: {setting}, {args.steps} alternating steps")
    print(f"{'method':8} {'median step (ms)':>17} {'peak memory (MiB)':>18}")
    for m in METHODS:
        print(f"{m:8} {1000 * med[m]:17.1f} {mem[m]:18.0f}")
    print(f"ratio MLS / MoCo-v2: time {med['mls'] / med['mocov2']:.3f}x, memory {mem['mls'] / mem['mocov2']:.3f}x")
    health_s = time_health(args)
    share = health_s / (args.log_every * med["mls"])
    print(f"health measures: {1000 * health_s:.1f} ms per log step, {share:.2%} of an average MLS step at "
          f"--log-every {args.log_every} ({health_s / med['mls']:.1%} of the step they are measured in)")
    monitor_s = time_monitor(args)
    epoch_s = args.epoch_images // args.batch_size * med["mls"]
    print(f"--monitor: {monitor_s:.2f} s per pass of {args.monitor_images} images, {monitor_s / epoch_s:.2%} of an "
          f"epoch of {args.epoch_images} images ({args.epoch_images // args.batch_size} MLS steps)")
    print(json.dumps({"setting": setting, "time_ratio": med["mls"] / med["mocov2"],
                      "memory_ratio": mem["mls"] / mem["mocov2"], "health_s": health_s, "health_share": share,
                      "monitor_s": monitor_s, "monitor_share": monitor_s / epoch_s, "median_s": med, "peak_mib": mem}))


if __name__ == "__main__":
    main()
