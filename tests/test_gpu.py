"""The GPU paths: mixed precision, channels-last, half-precision Q_g, views on the device and the health
measures on CUDA, each against the CPU computation. Skipped without a CUDA device (benchmarks/gpu_check.sh
runs them on a GPU machine)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import fill_queue, tiny
from mls.method import health

pytestmark = pytest.mark.gpu


def test_health_measures_on_cuda_match_the_cpu():
    gen = torch.Generator().manual_seed(0)
    queue = F.normalize(torch.randn(4096, 256, generator=gen) + 2.0, dim=1)
    valid = torch.arange(4096) < 4000
    cpu = health.queue_health(queue, valid, queue_g=F.normalize(torch.randn(4096, 2048, generator=gen), dim=1))
    gpu = health.queue_health(queue.cuda(), valid.cuda(), queue_g=None)
    for name in gpu:
        assert gpu[name].item() == pytest.approx(cpu[name].item(), rel=1e-3), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_mixed_precision_channels_last_step_on_cuda_matches_fp32(dtype):
    """Losses and selection stay in fp32: a bf16/fp16 step's loss is within mixed-precision error of fp32's."""
    model = tiny(queue_g_dtype="bfloat16" if dtype is torch.bfloat16 else "float16").cuda()
    model = model.to(memory_format=torch.channels_last)
    fill_queue(model)
    x = torch.randn(16, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    exact = model(x, x, diagnose=True)
    model.load_state_dict(state)
    with torch.autocast("cuda", dtype=dtype):
        mixed = model(x, x, diagnose=True)
    assert torch.isfinite(mixed["loss"]) and mixed["loss"].dtype == torch.float32
    assert mixed["loss"].item() == pytest.approx(exact["loss"].item(), rel=5e-2)
    mixed["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_views_made_on_cuda_match_the_same_views_made_on_the_cpu():
    """The device path's appearance steps (kornia) give the same pixels on CUDA as on the CPU, sample by sample."""
    from mls.data.augment import MoCoV2View
    from mls.data.device_views import WorkerView, apply_appearance, collate_views
    from mls.data.synthetic import SyntheticScenes

    view, scenes = MoCoV2View(64, hue=0.1, grayscale_p=0.2), SyntheticScenes(16, 96, seed=0)
    worker, samples = WorkerView(view), []
    for i in range(16):
        torch.manual_seed(i)
        v = worker(scenes.image(i))
        samples.append({"view1": v.image, "appearance1": v.appearance})
    batch = collate_views(samples)
    cpu = apply_appearance(batch["view1"], batch["appearance1"])
    params = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch["appearance1"].items()}
    gpu = apply_appearance(batch["view1"].cuda(), params)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-3, rtol=0)
