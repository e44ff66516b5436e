"""Transfer data: VOC -> COCO conversion, COCO instances, Cityscapes / VOC segmentation labels."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import voc_xml
from mls.data.synthetic import CLASSES, SyntheticScenes, write_coco, write_voc
from mls.transfer.detection_data import CocoInstances, load_detection_splits
from mls.transfer.segmentation_data import (
    SegmentationPairs,
    cityscapes_train_ids,
    segmentation_splits,
    segmentation_train_transform,
)


def _devkit(root, year, sets, objects):
    """A hand-made VOC tree: ``sets`` maps an image set to image names, ``objects`` each name to its objects."""
    voc = root / "VOCdevkit" / f"VOC{year}"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    for image_set, names in sets.items():
        (voc / "ImageSets/Main" / f"{image_set}.txt").write_text("".join(f"{n}\n" for n in names))
        for name in names:
            Image.new("RGB", (50, 40)).save(voc / "JPEGImages" / f"{name}.jpg")
            (voc / "Annotations" / f"{name}.xml").write_text(voc_xml(objects[name], size=(50, 40)))


def test_voc_becomes_coco_with_0_based_boxes_sorted_classes_and_difficult_ignored_in_test_only(tmp_path):
    objects = {"a": [("dog", 0, (1, 1, 10, 20))], "b": [("cat", 1, (5, 6, 14, 11))],
               "c": [("cat", 0, (11, 21, 40, 30)), ("dog", 1, (2, 3, 4, 5))]}
    _devkit(tmp_path, "2007", {"trainval": ["a"], "test": ["c"]}, objects)
    _devkit(tmp_path, "2012", {"trainval": ["b"]}, objects)
    (tmp_path / "VOCdevkit/VOC2007/ImageSets/Main/bird_trainval.txt").write_text("")  # a class without objects
    splits = load_detection_splits(tmp_path, "voc")
    assert [c["name"] for c in splits.train.loadCats(splits.category_ids)] == ["bird", "cat", "dog"]
    assert not splits.has_masks
    train = sorted(splits.train.dataset["annotations"], key=lambda a: a["bbox"][0])
    # VOC (1, 1, 10, 20) inclusive 1-based -> x, y = 0, 0 and w, h = 10, 20; (5, 6, 14, 11) -> 4, 5, 10, 6.
    assert [a["bbox"] for a in train] == [[0, 0, 10, 20], [4, 5, 10, 6]]
    assert [a["iscrowd"] for a in train] == [0, 0]  # difficult objects are trained on (VOC2012's cat)
    assert len(splits.train.imgs) == 2  # VOC2007 + VOC2012 trainval
    test = sorted(splits.test.dataset["annotations"], key=lambda a: a["bbox"][0])
    assert [(a["bbox"], a["category_id"], a["iscrowd"], a["area"]) for a in test] == [
        ([1, 2, 3, 3], 3, 1, 9), ([10, 20, 30, 10], 2, 0, 300)]


def test_voc_without_test_set_is_refused_in_plain_words(tmp_path):
    _devkit(tmp_path, "2007", {"trainval": ["a"]}, {"a": [("dog", 0, (1, 1, 10, 20))]})
    with pytest.raises(FileNotFoundError, match="test.txt"):
        load_detection_splits(tmp_path, "voc")
    with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
        load_detection_splits(tmp_path, "coco")
    with pytest.raises(ValueError, match="format must be one of coco, voc"):
        load_detection_splits(tmp_path, "yolo")


def test_coco_instances_give_the_scenes_boxes_masks_and_labels(tmp_path):
    write_coco(tmp_path, num_images=4, image_size=48, seed=3)
    splits = load_detection_splits(tmp_path, "coco")
    test = CocoInstances(splits.test, splits.test_images, train=False, masks=True, category_ids=splits.category_ids)
    scenes = SyntheticScenes(8, 48, seed=3)  # the val split holds scenes 4..7
    for k in range(4):
        image, target = test[k]
        scene = scenes.scene(4 + k)
        assert torch.allclose(image, torch.from_numpy(np.array(scene.image)).permute(2, 0, 1).float() / 255)
        assert target["labels"].tolist() == [label + 1 for label in scene.labels]
        assert torch.equal(target["boxes"], torch.from_numpy(scene.boxes))
        assert torch.equal(target["masks"].bool(), torch.from_numpy(scene.masks))


def test_training_flips_boxes_with_masks_and_drops_crowds(tmp_path):
    write_coco(tmp_path, num_images=6, image_size=48, seed=1, splits=("train2017", "val2017"))
    splits = load_detection_splits(tmp_path, "coco")
    first = splits.train.dataset["annotations"][0]
    first["iscrowd"] = 1
    train = CocoInstances(splits.train, splits.train_images, train=True, masks=True, category_ids=splits.category_ids)
    assert all(first["id"] not in [a["id"] for a in train._objects(i)] for i in train.ids)
    torch.manual_seed(0)
    flips = 0
    for k in range(len(train)):
        image, target = train[k]
        for box, mask in zip(target["boxes"], target["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)  # the box stays the tight box of its mask
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        path = train.image_dir / splits.train.imgs[train.ids[k]]["file_name"]
        original = torch.from_numpy(np.array(Image.open(path)))
        flips += torch.equal(image, original.flip(1).permute(2, 0, 1).float() / 255)
    assert 0 < flips < len(train)


def test_cityscapes_label_ids_map_to_the_19_train_ids(tmp_path):
    lut = cityscapes_train_ids()
    # Cityscapes' table: road 7 -> 0, sidewalk 8 -> 1, building 11 -> 2, car 26 -> 13, bicycle 33 -> 18;
    # unlabeled 0, ground 6, parking 9, guard rail 14 -> ignored.
    assert [int(lut[i]) for i in (7, 8, 11, 26, 33, 0, 6, 9, 14)] == [0, 1, 2, 13, 18, 255, 255, 255, 255]
    assert sorted(set(lut.tolist()) - {255}) == list(range(19))
    for split in ("train", "val"):  # one 8 x 6 image per split, in torchvision's Cityscapes layout
        (tmp_path / "leftImg8bit" / split / "aachen").mkdir(parents=True)
        (tmp_path / "gtFine" / split / "aachen").mkdir(parents=True)
        Image.new("RGB", (8, 6)).save(tmp_path / "leftImg8bit" / split / "aachen" / "aachen_0_0_leftImg8bit.png")
        ids = np.full((6, 8), 26, np.uint8)
        ids[:, :2] = 7
        ids[0, 0] = 0
        Image.fromarray(ids).save(tmp_path / "gtFine" / split / "aachen" / "aachen_0_0_gtFine_labelIds.png")
    train, test, num_classes, table = segmentation_splits(tmp_path, "cityscapes")
    assert num_classes == 19
    _, label = SegmentationPairs(test, num_classes, lut=table)[0]
    expected = torch.full((6, 8), 13)
    expected[:, :2] = 0
    expected[0, 0] = 255
    assert torch.equal(label, expected)


def test_voc_segmentation_reads_palette_labels_and_counts_background_plus_classes(tmp_path):
    write_voc(tmp_path, num_images=6, image_size=32, seed=0)
    train, test, num_classes, lut = segmentation_splits(tmp_path, "voc-seg")
    assert (len(train), len(test), num_classes, lut) == (3, 3, 1 + len(CLASSES), None)
    scenes = SyntheticScenes(6, 32, seed=0)
    image, label = SegmentationPairs(test, num_classes)[0]
    expected = torch.zeros(32, 32, dtype=torch.long)
    scene = scenes.scene(3)
    for cls, mask in zip(scene.labels, scene.masks):
        expected[torch.from_numpy(mask)] = cls + 1
    assert torch.equal(label, expected)
    with pytest.raises(ValueError, match=r"expected 0\.\.0 or 255"):  # every scene has an object
        SegmentationPairs(test, 1)[0]
    with pytest.raises(ValueError, match="dataset must be one of cityscapes, voc-seg"):
        segmentation_splits(tmp_path, "ade20k")


def test_training_crop_pads_labels_with_ignore_and_keeps_image_and_label_aligned():
    torch.manual_seed(0)
    label = torch.zeros(20, 20, dtype=torch.uint8)
    label[:, 10:] = 1
    image = Image.fromarray(np.where(label.numpy()[..., None] == 1, 255, 0).repeat(3, 2).astype(np.uint8))
    augment = segmentation_train_transform((20, 20), 32, (0.5, 0.5))
    pairs = SegmentationPairs([(image, Image.fromarray(label.numpy()))], 2, augment)
    x, y = pairs[0]  # 20 px scaled to 10 px, then padded to a 32 px crop
    assert x.shape == (3, 32, 32) and y.shape == (32, 32)
    assert (y == 255).sum() == 32 * 32 - 10 * 10
    white = x[0] > 0  # after normalisation, black pixels are negative and white ones positive
    assert torch.equal(white[y != 255], (y == 1)[y != 255])
