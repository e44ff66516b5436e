"""The synthetic scenes and their COCO / VOC files, checked against independent computations."""
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from mls.cli import main as mls_main
from mls.data.synthetic import CLASSES, SyntheticScenes, write_coco, write_voc

# The nominal colour of each class, written out by hand from the class names.
NAMED_COLOURS = {"red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
                 "magenta": (255, 0, 255), "cyan": (0, 255, 255), "orange": (255, 140, 0),
                 "white": (255, 255, 255)}


def mask_box(mask):
    """Tight box of a mask from its occupied rows and columns, xyxy with an exclusive end."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]


def outer_ring(mask):
    """Pixels 4-adjacent to the mask but not in it."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown & ~mask


@pytest.fixture(scope="module")
def scenes():
    return SyntheticScenes(num_images=60, image_size=64, seed=3)


def test_same_seed_same_pixels_other_seed_differs():
    a, b = SyntheticScenes(20, 48, seed=1), SyntheticScenes(500, 48, seed=1)
    other = SyntheticScenes(20, 48, seed=2)
    for i in (0, 7, 19):
        # Scene i depends on (seed, i) only, not on the data set's length.
        assert np.array_equal(np.asarray(a.image(i)), np.asarray(b.image(i)))
        assert not np.array_equal(np.asarray(a.image(i)), np.asarray(other.image(i)))
    assert not np.array_equal(np.asarray(a.image(0)), np.asarray(a.image(1)))


def test_objects_have_distinct_classes_and_cover_all_classes(scenes):
    seen = set()
    for i in range(len(scenes)):
        labels = scenes.scene(i).labels
        assert 1 <= len(labels) <= 3
        assert len(set(labels)) == len(labels)
        seen |= set(labels)
    assert seen == set(range(len(CLASSES)))


def test_boxes_enclose_masks_exactly(scenes):
    for i in range(len(scenes)):
        s = scenes.scene(i)
        assert s.boxes.dtype == np.float32 and s.masks.dtype == bool
        assert s.masks.shape == (len(s.labels), 64, 64) and s.boxes.shape == (len(s.labels), 4)
        for box, mask in zip(s.boxes, s.masks):
            assert box.tolist() == mask_box(mask)


def test_masks_match_drawn_pixels(scenes):
    for i in range(len(scenes)):
        s = scenes.scene(i)
        pixels = np.asarray(s.image).astype(int)
        assert s.masks.sum(0).max() <= 1, "visible masks overlap"
        for label, mask in zip(s.labels, s.masks):
            colours = np.unique(pixels[mask], axis=0)
            striped = "striped" in CLASSES[label]
            assert len(colours) <= (2 if striped else 1)
            main = colours[np.argmax(colours.sum(1))]
            # The brightest colour in the mask is the class's named colour ...
            names = list(NAMED_COLOURS)
            nearest = names[np.argmin([np.abs(main - NAMED_COLOURS[n]).sum() for n in names])]
            assert CLASSES[label].startswith(nearest)
            # ... and no pixel just outside the mask has it: the mask ends where the colour ends.
            ring = outer_ring(mask)
            assert not (pixels[ring] == colours[:, None]).all(-1).any()


def test_labels_multi_hot_and_items_agree(scenes):
    multi_hot = scenes.multi_hot()
    assert multi_hot.shape == (len(scenes), len(CLASSES))
    for i in range(len(scenes)):
        labels = scenes.scene(i).labels
        assert scenes.labels(i) == labels
        expected = torch.tensor([1.0 if c in labels else 0.0 for c in range(len(CLASSES))])
        assert torch.equal(multi_hot[i], expected)
        image, target = scenes[i]
        assert torch.equal(target, expected) and image.mode == "RGB" and image.size == (64, 64)


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_images=0), "num_images"),
    (dict(image_size=4), "image_size"),
    (dict(min_objects=3, max_objects=2), "min_objects"),
    (dict(max_objects=len(CLASSES) + 1), "number of classes"),
])
def test_bad_arguments_are_named(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SyntheticScenes(**kwargs)
    with pytest.raises(IndexError):
        SyntheticScenes(5).scene(5)


def test_coco_files_load_in_pycocotools_and_match_the_scenes(tmp_path):
    paths = write_coco(tmp_path, num_images=12, image_size=48, seed=5)
    assert set(paths) == {"train2017", "val2017"}
    scenes = SyntheticScenes(24, 48, seed=5)
    ids = {}
    for split, path in paths.items():
        coco = COCO(str(path))
        assert [c["name"] for c in coco.loadCats(sorted(coco.getCatIds()))] == list(CLASSES)
        assert sorted(coco.getCatIds()) == list(range(1, len(CLASSES) + 1))
        ids[split] = set(coco.getImgIds())
        assert len(ids[split]) == 12
        for image_id in ids[split]:
            info = coco.loadImgs(image_id)[0]
            scene = scenes.scene(image_id - 1)
            on_disk = np.asarray(Image.open(tmp_path / split / info["file_name"]))
            assert np.array_equal(on_disk, np.asarray(scene.image))
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            assert [a["category_id"] - 1 for a in anns] == scene.labels
            for ann, mask in zip(anns, scene.masks):
                assert np.array_equal(coco.annToMask(ann).astype(bool), mask)
                x0, y0, x1, y1 = mask_box(mask)
                assert ann["bbox"] == [x0, y0, x1 - x0, y1 - y0]
                assert ann["area"] == mask.sum() and ann["iscrowd"] == 0
    assert not ids["train2017"] & ids["val2017"]


def test_voc_tree_matches_the_scenes(tmp_path):
    voc = write_voc(tmp_path, num_images=200, image_size=64, seed=2, test_fraction=0.25)
    scenes = SyntheticScenes(200, 64, seed=2)
    main = voc / "ImageSets" / "Main"
    trainval = main.joinpath("trainval.txt").read_text().split()
    test = main.joinpath("test.txt").read_text().split()
    assert len(trainval) == 150 and len(test) == 50 and not set(trainval) & set(test)
    assert sorted(trainval + test) == [f"{k:06d}" for k in range(1, 201)]
    assert (voc / "ImageSets" / "Segmentation" / "test.txt").read_text().split() == test
    difficult_count = 0
    expected_flags = {"trainval": {}, "test": {}}
    for split, names in (("trainval", trainval), ("test", test)):
        for name in names:
            scene = scenes.scene(int(name) - 1)
            root = ET.parse(voc / "Annotations" / f"{name}.xml").getroot()
            assert root.findtext("filename") == f"{name}.jpg"
            assert (int(root.findtext("size/width")), int(root.findtext("size/height"))) == (64, 64)
            objects = root.findall("object")
            assert [o.findtext("name") for o in objects] == [CLASSES[c] for c in scene.labels]
            flags = {c: -1 for c in CLASSES}
            for obj, mask in zip(objects, scene.masks):
                x0, y0, x1, y1 = mask_box(mask)  # VOC: 1-based, inclusive
                box = [int(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")]
                assert box == [x0 + 1, y0 + 1, x1, y1]
                difficult = obj.findtext("difficult") == "1"
                assert difficult == (mask.sum() < 0.035 * 64 * 64)
                difficult_count += difficult
                flags[obj.findtext("name")] = 0 if difficult else 1
            expected_flags[split][name] = flags
            segmentation = Image.open(voc / "SegmentationClass" / f"{name}.png")
            assert segmentation.mode == "P"
            expected = np.zeros((64, 64), dtype=np.uint8)
            for label, mask in zip(scene.labels, scene.masks):
                expected[mask] = label + 1
            assert np.array_equal(np.asarray(segmentation), expected)
            assert Image.open(voc / "JPEGImages" / f"{name}.jpg").size == (64, 64)
    assert 0 < difficult_count < 40  # a few small objects are difficult
    for split in ("trainval", "test"):
        for cls in CLASSES:
            lines = [line.split() for line in main.joinpath(f"{cls}_{split}.txt").read_text().splitlines()]
            assert [name for name, _ in lines] == list(expected_flags[split])
            assert {name: int(flag) for name, flag in lines} == {
                name: flags[cls] for name, flags in expected_flags[split].items()}


def test_voc_tree_reads_in_torchvision(tmp_path):
    from torchvision.datasets import VOCDetection, VOCSegmentation

    write_voc(tmp_path, num_images=6, image_size=32, seed=0)
    detection = VOCDetection(str(tmp_path), year="2007", image_set="test")
    image, target = detection[0]
    assert len(detection) == 3 and image.size == (32, 32)
    assert target["annotation"]["object"][0]["name"] in CLASSES
    assert len(VOCSegmentation(str(tmp_path), year="2007", image_set="trainval")) == 3


def test_synth_command_writes_and_reports(tmp_path, capsys):
    mls_main(["synth", str(tmp_path / "plain"), "--num-images", "5", "--image-size", "32",
              "--format", "folder"])
    files = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert files == [f"{k:012d}.png" for k in range(1, 6)]
    assert str(tmp_path / "plain") in capsys.readouterr().out
    mls_main(["synth", str(tmp_path / "coco"), "--num-images", "3", "--image-size", "32"])
    assert "instances_val2017.json" in capsys.readouterr().out
    assert len(list((tmp_path / "coco" / "val2017").glob("*.png"))) == 3


def test_synth_help_shows_each_option(capsys):
    with pytest.raises(SystemExit):
        mls_main(["synth", "--help"])
    text = capsys.readouterr().out
    for option in ("out", "--num-images", "--image-size", "--seed", "--format"):  # as the README writes them
        assert option in text
    assert "Side of the square images" in text
