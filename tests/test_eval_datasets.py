"""Each evaluation data set read from a tiny fake copy of its official layout."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
import torch
from PIL import Image

from conftest import voc_xml
from mls.data.synthetic import CLASSES
from mls.eval.datasets import VOC_CLASSES, load_dataset
from mls.eval.metrics import IGNORE


def image(path: Path, value: int = 0) -> None:
    """A real 12 x 12 image file whose pixels all equal ``value``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12), (value, value, value)).save(path)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def targets(dataset) -> list:
    """Every target of a split, checking on the way that each image loads as RGB."""
    out = []
    for img, target in dataset:
        assert img.mode == "RGB" and img.size == (12, 12)
        out.append(target.tolist() if isinstance(target, torch.Tensor) else target)
    return out


def grays(dataset) -> list[int]:
    """The grey value each split image was written with: identifies which file was read."""
    return [int(np.asarray(img)[0, 0, 0]) for img, _ in dataset]


# ---------------------------------------------------------------- VOC2007

def fake_voc(root: Path, images: dict[str, tuple[str, list]], per_class: list[str] | None = None) -> None:
    voc = root / "VOCdevkit/VOC2007"
    for split in ("trainval", "test"):
        ids = [i for i, (s, _) in images.items() if s == split]
        write(voc / f"ImageSets/Main/{split}.txt", "".join(i + "\n" for i in ids))
    for i, (_, objects) in images.items():
        image(voc / f"JPEGImages/{i}.jpg")
        write(voc / f"Annotations/{i}.xml", voc_xml(objects))
    for name in per_class or []:
        write(voc / f"ImageSets/Main/{name}_trainval.txt", "")


def test_voc07_multi_hot_with_difficult_only_classes_ignored(tmp_path):
    fake_voc(tmp_path, {
        "000001": ("trainval", [("dog", 0), ("cat", 1)]),              # cat only difficult -> ignore
        "000002": ("trainval", [("cat", 1), ("cat", 0), ("dog", 1)]),  # a non-difficult cat -> positive
        "000003": ("test", [("person", 0), ("person", 0)]),
        "000004": ("test", [("bird", 1)]),
    })
    data = load_dataset("voc07", str(tmp_path))
    assert data.classes == list(VOC_CLASSES) and len(data.classes) == 20 and data.multilabel
    assert (len(data.train), len(data.test)) == (2, 2)

    def expected(pos: list[str], ignored: list[str]) -> list[float]:
        return [1.0 if c in pos else float(IGNORE) if c in ignored else 0.0 for c in VOC_CLASSES]

    assert targets(data.train) == [expected(["dog"], ["cat"]), expected(["cat"], ["dog"])]
    assert targets(data.test) == [expected(["person"], []), expected([], ["bird"])]


def test_voc07_takes_classes_from_per_class_lists_and_rejects_unknown_objects(tmp_path):
    fake_voc(tmp_path, {"a": ("trainval", [("square", 0)]), "b": ("test", [("triangle", 0)])},
             per_class=["triangle", "circle", "square"])
    data = load_dataset("voc07", str(tmp_path))
    assert data.classes == ["circle", "square", "triangle"]
    assert targets(data.train) == [[0.0, 1.0, 0.0]] and targets(data.test) == [[0.0, 0.0, 1.0]]
    write(tmp_path / "VOCdevkit/VOC2007/Annotations/b.xml", voc_xml([("hexagon", 0)]))
    with pytest.raises(ValueError, match="hexagon"):
        targets(load_dataset("voc07", str(tmp_path)).test)


# ---------------------------------------------------------------- single-label sets

def test_cub200(tmp_path):
    base = tmp_path / "CUB_200_2011"
    files = ["001.Albatross/a.jpg", "001.Albatross/b.jpg", "002.Auklet/c.jpg", "002.Auklet/d.jpg", "002.Auklet/e.jpg"]
    for k, f in enumerate(files):
        image(base / "images" / f, 10 * k)
    write(base / "images.txt", "".join(f"{k + 1} {f}\n" for k, f in enumerate(files)))
    write(base / "image_class_labels.txt", "1 1\n2 1\n3 2\n4 2\n5 2\n")
    write(base / "train_test_split.txt", "1 1\n2 0\n3 1\n4 0\n5 1\n")
    write(base / "classes.txt", "1 001.Albatross\n2 002.Auklet\n")
    data = load_dataset("cub200", str(tmp_path))
    assert data.classes == ["001.Albatross", "002.Auklet"] and not data.multilabel
    assert targets(data.train) == [0, 1, 1] and grays(data.train) == [0, 20, 40]
    assert targets(data.test) == [0, 1] and grays(data.test) == [10, 30]


def test_flowers102_train_and_val_make_the_training_split(tmp_path):
    base = tmp_path / "flowers-102"
    for k in range(1, 8):
        image(base / f"jpg/image_{k:05d}.jpg", 10 * k)
    sio.savemat(base / "imagelabels.mat", {"labels": np.array([1, 2, 1, 102, 2, 1, 5])})
    sio.savemat(base / "setid.mat", {"trnid": np.array([1, 2]), "valid": np.array([7, 3]), "tstid": np.array([4, 5, 6])})
    data = load_dataset("flowers102", str(tmp_path))
    assert len(data.classes) == 102 and data.classes[0] == "pink primrose"
    assert targets(data.train) == [0, 1, 4, 0] and grays(data.train) == [10, 20, 70, 30]
    assert targets(data.test) == [101, 1, 0]


def test_stanford_cars(tmp_path):
    base = tmp_path / "stanford_cars"
    annos = lambda rows: np.array(rows, dtype=[("fname", "O"), ("class", "O")])
    for name in ("00001.jpg", "00002.jpg", "00003.jpg"):
        image(base / "cars_train" / name)
    image(base / "cars_test/00001.jpg")
    image(base / "cars_test/00002.jpg")
    (base / "devkit").mkdir()
    sio.savemat(base / "devkit/cars_meta.mat", {"class_names": np.array(["AM General", "Acura", "BMW"], dtype=object)})
    sio.savemat(base / "devkit/cars_train_annos.mat",
                {"annotations": annos([("00001.jpg", 3), ("00002.jpg", 1), ("00003.jpg", 3)])})
    sio.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": annos([("00001.jpg", 2), ("00002.jpg", 3)])})
    data = load_dataset("cars", str(tmp_path))
    assert data.classes == ["AM General", "Acura", "BMW"]
    assert targets(data.train) == [2, 0, 2] and targets(data.test) == [1, 2]


def test_fgvc_aircraft_variants_trainval_to_test(tmp_path):
    base = tmp_path / "fgvc-aircraft-2013b/data"
    for k, name in enumerate(("0001", "0002", "0003")):
        image(base / f"images/{name}.jpg", 10 * k)
    write(base / "variants.txt", "707-320\nA300B4\nF-16A/B\n")
    write(base / "images_variant_trainval.txt", "0001 F-16A/B\n0002 707-320\n")
    write(base / "images_variant_test.txt", "0003 A300B4\n")
    data = load_dataset("aircraft", str(tmp_path))
    assert data.classes == ["707-320", "A300B4", "F-16A/B"]
    assert targets(data.train) == [2, 0] and grays(data.train) == [0, 10] and targets(data.test) == [1]


def test_oxford_pets(tmp_path):
    base = tmp_path / "oxford-iiit-pet"
    for name in ("Abyssinian_1", "american_bulldog_2", "Abyssinian_3"):
        image(base / f"images/{name}.jpg")
    write(base / "annotations/trainval.txt", "Abyssinian_1 1 1 1\namerican_bulldog_2 2 2 1\n")
    write(base / "annotations/test.txt", "Abyssinian_3 1 1 1\n")
    data = load_dataset("pets", str(tmp_path))
    assert data.classes == ["Abyssinian", "American Bulldog"]
    assert targets(data.train) == [0, 1] and targets(data.test) == [0]


def test_dtd_partition_1_train_and_val_to_test(tmp_path):
    base = tmp_path / "dtd/dtd"
    for k, rel in enumerate(("banded/b1.jpg", "banded/b2.jpg", "dotted/d1.jpg", "dotted/d2.jpg")):
        image(base / "images" / rel, 10 * k)
    write(base / "labels/train1.txt", "banded/b1.jpg\ndotted/d1.jpg\n")
    write(base / "labels/val1.txt", "dotted/d2.jpg\n")
    write(base / "labels/test1.txt", "banded/b2.jpg\n")
    with pytest.raises(ValueError, match="split val lists the classes .'banded'. differently"):
        load_dataset("dtd", str(tmp_path))  # DTD numbers classes within each split: all must list the same
    for k, rel in enumerate(("banded/b3.jpg", "dotted/d3.jpg")):
        image(base / "images" / rel, 50 + 10 * k)
    write(base / "labels/val1.txt", "dotted/d2.jpg\nbanded/b3.jpg\n")
    write(base / "labels/test1.txt", "banded/b2.jpg\ndotted/d3.jpg\n")
    data = load_dataset("dtd", str(tmp_path))
    assert data.classes == ["banded", "dotted"]
    assert targets(data.train) == [0, 1, 1, 0] and grays(data.train) == [0, 20, 30, 50]
    assert targets(data.test) == [0, 1] and grays(data.test) == [10, 60]


def test_indoor67_official_lists(tmp_path):
    for k, rel in enumerate(("kitchen/k1.jpg", "kitchen/k2.jpg", "bar/b1.jpg")):
        image(tmp_path / "Images" / rel, 10 * k)
    write(tmp_path / "TrainImages.txt", "kitchen/k1.jpg\nbar/b1.jpg\n")
    write(tmp_path / "TestImages.txt", "kitchen/k2.jpg\n")
    data = load_dataset("indoor67", str(tmp_path))
    assert data.classes == ["bar", "kitchen"]
    assert targets(data.train) == [1, 0] and grays(data.train) == [0, 20] and targets(data.test) == [1]
    write(tmp_path / "TestImages.txt", "garage/g1.jpg\n")
    with pytest.raises(FileNotFoundError, match="garage"):
        load_dataset("indoor67", str(tmp_path))


def test_imagefolder_uses_val_when_there_is_no_test(tmp_path):
    for rel in ("train/cat/1.png", "train/dog/2.png", "train/dog/3.png", "val/cat/4.png"):
        image(tmp_path / rel)
    with pytest.raises(ValueError, match="class folders differ"):
        load_dataset("imagefolder", str(tmp_path))
    image(tmp_path / "val/dog/5.png")
    data = load_dataset("imagefolder", str(tmp_path))
    assert data.classes == ["cat", "dog"] and targets(data.train) == [0, 1, 1] and targets(data.test) == [0, 1]


# ---------------------------------------------------------------- multi-label sets

def test_coco_multi_hot_by_category_id_order_and_unannotated_images_dropped(tmp_path):
    cats = [{"id": 7, "name": "zebra"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    for split, anns in (("train2017", [(1, 7), (1, 1), (1, 7), (2, 3)]), ("val2017", [(5, 1)])):
        ids = sorted({i for i, _ in anns} | {99})  # image 99 has no annotation
        for i in ids:
            image(tmp_path / split / f"{i:012d}.jpg")
        write(tmp_path / f"annotations/instances_{split}.json", json.dumps({
            "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": 12, "height": 12} for i in ids],
            "annotations": [{"id": k, "image_id": i, "category_id": c, "bbox": [0, 0, 4, 4], "area": 16,
                             "iscrowd": 0} for k, (i, c) in enumerate(anns)],
            "categories": cats,
        }))
    data = load_dataset("coco", str(tmp_path))
    assert data.classes == ["person", "car", "zebra"] and data.multilabel
    assert targets(data.train) == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    assert targets(data.test) == [[1.0, 0.0, 0.0]]


def test_synthetic_train_and_test_are_different_images():
    data = load_dataset("synthetic", image_size=32, num_images=6)
    assert data.classes == list(CLASSES) and data.multilabel and (len(data.train), len(data.test)) == (6, 3)
    img, target = data.train[0]
    assert img.size == (32, 32) and target.shape == (len(CLASSES),) and set(target.tolist()) <= {0.0, 1.0}
    assert 1 <= target.sum() <= 3  # 1-3 objects of distinct classes per scene
    train = {np.asarray(data.train[i][0]).tobytes() for i in range(6)}
    assert not train & {np.asarray(data.test[i][0]).tobytes() for i in range(3)}


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("name, present, missing", [
    ("cub200", ["CUB_200_2011/images/", "CUB_200_2011/classes.txt"], "CUB_200_2011/images.txt"),
    ("pets", ["oxford-iiit-pet/images/", "oxford-iiit-pet/annotations/trainval.txt"],
     "oxford-iiit-pet/annotations/test.txt"),
    ("voc07", ["VOCdevkit/VOC2007/JPEGImages/"], "VOCdevkit/VOC2007/Annotations"),
    ("coco", ["annotations/instances_train2017.json", "train2017/", "val2017/"], "annotations/instances_val2017.json"),
    ("dtd", ["dtd/dtd/images/", "dtd/dtd/labels/train1.txt", "dtd/dtd/labels/val1.txt"], "dtd/dtd/labels/test1.txt"),
    ("flowers102", ["flowers-102/jpg/", "flowers-102/imagelabels.mat"], "flowers-102/setid.mat"),
])
def test_missing_file_is_named_with_the_expected_layout(tmp_path, name, present, missing):
    for rel in present:
        (tmp_path / rel).mkdir(parents=True) if rel.endswith("/") else write(tmp_path / rel, "")
    with pytest.raises(FileNotFoundError) as error:
        load_dataset(name, str(tmp_path))
    message = str(error.value)
    assert f"{tmp_path / missing} does not exist" in message and "expected under --data" in message


def test_bad_names_and_missing_data_folder_are_explained():
    with pytest.raises(ValueError, match="dataset must be one of .*voc07.*got 'imagenet'"):
        load_dataset("imagenet", "/nowhere")
    with pytest.raises(ValueError, match="'cars' needs --data"):
        load_dataset("cars")
