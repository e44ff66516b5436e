"""Transfer models and training pieces: detectors, FCN, sliding-window inference, schedules, evaluation plumbing."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.ops import FrozenBatchNorm2d

from mls.data.synthetic import write_coco
from mls.method.backbones import build_backbone
from mls.transfer.detection import build_detector, evaluate_detection
from mls.transfer.detection_data import CocoInstances, collate_lists, load_detection_splits
from mls.transfer.segmentation import build_fcn, build_segmenter, dilated, slide_logits
from mls.transfer.training import TransferModule, parameter_groups, per_device_batch, poly, warmup_multistep


@pytest.mark.parametrize("arch, small_stem, masks", [("resnet18", True, True), ("resnet34", False, False),
                                                      ("resnet50", False, True)])
def test_detector_fine_tunes_every_layer_with_trainable_batchnorm_on_the_given_weights(arch, small_stem, masks):
    backbone, _ = build_backbone(arch, small_stem)
    expected = {k: v.clone() for k, v in backbone.state_dict().items()}
    detector = build_detector(backbone, num_classes=5, masks=masks, train_sizes=(64,), max_size=64, channels=16)
    assert all(p.requires_grad for p in detector.parameters())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in detector.modules())
    body = detector.backbone.body.state_dict()
    assert all(torch.equal(body[k], v) for k, v in expected.items() if not k.startswith("fc"))
    assert detector.roi_heads.has_mask() == masks
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(detector)  # what DDP training does
    assert not any(type(m) is nn.BatchNorm2d for m in synced.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) > 20
    detector.train()
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 20.0, 24.0]]), "labels": torch.tensor([3]),
                "masks": torch.zeros(1, 64, 64, dtype=torch.uint8)}] * 2
    losses = detector([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], targets)
    assert ("loss_mask" in losses) == masks and all(torch.isfinite(v) for v in losses.values())


@pytest.mark.slow
def test_fcn_dilates_resnet50_to_output_stride_8_with_the_same_weights():
    backbone, _ = build_backbone("resnet50", small_stem=False)
    expected = backbone.state_dict()
    net = dilated(backbone, "resnet50")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in expected.items())
    x = torch.rand(1, 3, 64, 64)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
    assert stem.eval()(x).shape[-2:] == (8, 8)  # 64 / 8; undilated ResNet-50 gives 2 x 2
    fcn = build_fcn(build_backbone("resnet18", True)[0], "resnet18", num_classes=7).eval()
    out = fcn(x)
    assert out["out"].shape == out["aux"].shape == (1, 7, 64, 64)
    with pytest.raises(ValueError, match="only resnet50, resnet101 can be dilated"):
        dilated(build_backbone("resnet18")[0], "resnet18")


@pytest.mark.slow
def test_pspnet_pools_the_stride_8_map_of_dilated_resnet50_into_bins_1_2_3_6():
    torch.manual_seed(0)
    model = build_segmenter(build_backbone("resnet50")[0], "resnet50", num_classes=5, head="pspnet").eval()
    seen = {}
    model.backbone.register_forward_hook(lambda m, i, out: seen.update(features=out["out"]))
    pools = [m for m in model.classifier.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    for k, pool in enumerate(pools):
        pool.register_forward_hook(lambda m, i, out, k=k: seen.update({k: out}))
    x = torch.rand(1, 3, 72, 56)
    with torch.no_grad():
        out = model(x)
    assert out["out"].shape == out["aux"].shape == (1, 5, 72, 56)
    features = seen["features"]
    assert features.shape == (1, 2048, 9, 7)  # 72 / 8, 56 / 8: output stride 8
    for k, b in enumerate((1, 2, 3, 6)):  # each bin: the mean of its cells, as adaptive pooling defines them
        rows = [(i * 9 // b, -(-(i + 1) * 9 // b)) for i in range(b)]
        cols = [(j * 7 // b, -(-(j + 1) * 7 // b)) for j in range(b)]
        expected = torch.stack([torch.stack([features[0, :, r0:r1, c0:c1].mean((1, 2)) for c0, c1 in cols], -1)
                                for r0, r1 in rows], -2)
        assert torch.allclose(seen[k][0], expected, atol=1e-5)
    assert len(pools) == 4


class _Pointwise(nn.Module):
    """A per-pixel model: sliding windows must give exactly its whole-image output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return {"out": self.conv(x)}


def test_slide_inference_equals_whole_image_for_a_per_pixel_model_and_covers_every_pixel():
    torch.manual_seed(0)
    model, image = _Pointwise(), torch.rand(1, 3, 37, 53)
    with torch.no_grad():
        assert torch.allclose(slide_logits(model, image, 4, crop=16, stride=11), model(image)["out"], atol=1e-6)
        # Windows smaller than the image in one direction and larger in the other.
        assert torch.allclose(slide_logits(model, image, 4, crop=40, stride=30), model(image)["out"], atol=1e-6)


def test_detectron2_warmup_multistep_schedule_by_hand():
    f = lambda step: warmup_multistep(step, warmup_iters=100, steps=(1000, 1500), warmup_factor=0.001)  # noqa: E731
    # warm-up: 0.001 * (1 - a) + a with a = step / 100
    assert f(0) == pytest.approx(0.001)
    assert f(50) == pytest.approx(0.001 * 0.5 + 0.5)
    assert [f(100), f(999), f(1000), f(1499), f(1500), f(5000)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_mmseg_poly_schedule_by_hand():
    # lr = (base - min) * (1 - t / T) ** 0.9 + min, as a factor of base = 0.01, min = 1e-4
    assert poly(0, 100, 0.9, 0.01) == pytest.approx(1.0)
    assert poly(50, 100, 0.9, 0.01) == pytest.approx((0.01 - 1e-4) * 0.5 ** 0.9 / 0.01 + 0.01)
    assert poly(100, 100, 0.9, 0.01) == pytest.approx(0.01)


def test_fine_tuning_trains_batchnorm_of_a_backbone_loaded_in_eval_mode():
    backbone = build_backbone("resnet18")[0].eval()
    module = TransferModule(backbone, lambda model, batch: {}, lr=0.1, lr_factor=lambda step: 1.0)
    assert all(m.training for m in module.modules())


def test_no_weight_decay_on_normalisation_and_batch_split_over_gpus():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    decayed, norm = parameter_groups(model, weight_decay=1e-4, norm_weight_decay=0.0)
    assert {id(p) for p in norm["params"]} == {id(model[1].weight), id(model[1].bias)}
    assert len(decayed["params"]) == 4 and (decayed["weight_decay"], norm["weight_decay"]) == (1e-4, 0.0)
    assert per_device_batch(16, devices=8, num_nodes=1) == 2
    with pytest.raises(ValueError, match="multiple of devices x num_nodes = 3"):
        per_device_batch(16, devices=3, num_nodes=1)


class _Oracle(nn.Module):
    """A 'detector' that answers each image with its ground truth in torchvision's output format."""

    def __init__(self, dataset):
        super().__init__()
        self.transform = SimpleNamespace(min_size=(800,))
        self.answers = [dataset[k][1] for k in range(len(dataset))]

    def forward(self, images):
        outputs = []
        for _ in images:
            target = self.answers.pop(0)
            n = len(target["labels"])
            outputs.append({"boxes": target["boxes"], "labels": target["labels"], "scores": torch.linspace(0.9, 0.5, n),
                            "masks": target["masks"][:, None].float()})
        return outputs


def test_evaluation_maps_labels_boxes_and_masks_back_to_coco_and_scores_ground_truth_100(tmp_path):
    write_coco(tmp_path, num_images=5, image_size=40, seed=2)
    splits = load_detection_splits(tmp_path, "coco")
    categories = [3, 1, 2, 4, 5, 6, 7, 8]  # an unusual label -> category order must be undone
    test = CocoInstances(splits.test, splits.test_images, False, True, categories)
    loader = DataLoader(test, batch_size=2, collate_fn=collate_lists)
    scores = evaluate_detection(_Oracle(test), loader, splits.test, categories, test_size=40, masks=True)
    assert scores == pytest.approx({f"{t}_{m}": 100.0 for t in ("bbox", "segm") for m in ("AP", "AP50", "AP75")})
    shuffled = _Oracle(test)
    for answer in shuffled.answers:  # wrong classes: nothing matches
        answer["labels"] = answer["labels"] % 8 + 1
    assert evaluate_detection(shuffled, loader, splits.test, categories, 40, masks=False) == pytest.approx(
        {"bbox_AP": 0.0, "bbox_AP50": 0.0, "bbox_AP75": 0.0})


def test_segmentation_evaluation_matches_a_pixel_count_over_the_test_set():
    from mls.transfer.segmentation import evaluate_segmentation

    torch.manual_seed(1)
    model = _Pointwise().eval()
    images = [torch.rand(1, 3, 9, 13), torch.rand(1, 3, 12, 7)]
    labels = [torch.randint(0, 4, (1, 9, 13)), torch.randint(0, 4, (1, 12, 7))]
    labels[0][0, :2] = 255
    scores = evaluate_segmentation(model, list(zip(images, labels)), num_classes=4)
    with torch.no_grad():
        pred = torch.cat([model(x)["out"].argmax(1).flatten() for x in images])
    target = torch.cat([y.flatten() for y in labels])
    pred, target = pred[target != 255], target[target != 255]
    ious = [((pred == c) & (target == c)).sum() / ((pred == c) | (target == c)).sum() for c in range(4)]
    present = [c for c in range(4) if (target == c).any()]
    accs = [((pred == c) & (target == c)).sum() / (target == c).sum() for c in present]
    assert scores["mIoU"] == pytest.approx(100 * float(sum(ious)) / 4)
    assert scores["mAcc"] == pytest.approx(100 * float(sum(accs)) / len(present))
    assert scores["aAcc"] == pytest.approx(100 * float((pred == target).float().mean()))


@pytest.mark.slow
@pytest.mark.parametrize("masks", [False, True], ids=["faster_rcnn_c4", "mask_rcnn_c4"])
def test_c4_detector_splits_the_resnet_at_layer3_and_runs_layer4_as_the_box_head(masks):
    backbone, _ = build_backbone("resnet18")
    expected = {k: v.clone() for k, v in backbone.layer4.state_dict().items()}
    detector = build_detector(backbone, num_classes=5, masks=masks, train_sizes=(64,), max_size=64, channels=16,
                              rois_per_image=8, head="c4")
    detector.rpn._post_nms_top_n = {"training": 16, "testing": 8}  # few RoIs through layer4: a quick test
    body = detector.backbone.body
    assert hasattr(body, "layer3") and not hasattr(body, "layer4")  # backbone: stem + res2..res4
    layer4 = detector.roi_heads.box_head.layer4
    assert layer4 is backbone.layer4 and all(torch.equal(layer4.state_dict()[k], v) for k, v in expected.items())
    x = torch.rand(2, 3, 64, 64)
    assert [tuple(f.shape[-2:]) for f in body(x).values()] == [(4, 4)]  # one map at stride 16
    assert detector.roi_heads.box_roi_pool.output_size == (14, 14)
    assert detector.roi_heads.has_mask() == masks
    detector.train()
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 44.0]]), "labels": torch.tensor([3]),
                "masks": torch.zeros(1, 64, 64, dtype=torch.uint8)}] * 2
    losses = detector(list(x), targets)
    assert ("loss_mask" in losses) == masks and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert layer4[0].conv1.weight.grad is not None and backbone.conv1.weight.grad is not None
    detector.eval()
    with torch.no_grad():
        out = detector(list(x))
    assert len(out) == 2 and ("masks" in out[0]) == masks
