"""Classification data sets read from their official on-disk layouts, as (train, test) splits.

Each split yields ``(PIL image, target)``: an int class index for single-label sets, a float
multi-hot vector for multi-label ones (``voc07``, ``coco``, ``synthetic``). Nothing is downloaded.
Expected layout under ``--data DIR`` (the torchvision-backed sets use torchvision's folder names):

| name | layout under DIR | train -> test |
|---|---|---|
| ``voc07`` | ``VOCdevkit/VOC2007/{JPEGImages,Annotations}/``, ``ImageSets/Main/{trainval,test}.txt`` | trainval -> test |
| ``cub200`` | ``CUB_200_2011/{images/,images.txt,image_class_labels.txt,train_test_split.txt,classes.txt}`` | 1 -> 0 in the split file |
| ``flowers102`` | ``flowers-102/{jpg/,imagelabels.mat,setid.mat}`` | train+val -> test |
| ``cars`` | ``stanford_cars/{cars_train/,cars_test/,cars_test_annos_withlabels.mat}``, ``stanford_cars/devkit/{cars_meta.mat,cars_train_annos.mat}`` | train -> test |
| ``aircraft`` | ``fgvc-aircraft-2013b/data/{images/,variants.txt,images_variant_trainval.txt,images_variant_test.txt}`` | trainval -> test (variants) |
| ``pets`` | ``oxford-iiit-pet/{images/,annotations/trainval.txt,annotations/test.txt}`` | trainval -> test |
| ``dtd`` | ``dtd/dtd/{images/,labels/train1.txt,labels/val1.txt,labels/test1.txt}`` | train1+val1 -> test1 |
| ``indoor67`` | ``Images/<class>/*.jpg``, ``TrainImages.txt``, ``TestImages.txt`` | official lists |
| ``imagefolder`` | ``train/<class>/*``, and ``test/<class>/*`` or ``val/<class>/*`` | train -> test (or val) |
| ``coco`` | ``annotations/instances_{train,val}2017.json``, ``train2017/``, ``val2017/`` | train2017 -> val2017 |
| ``synthetic`` | none: ``mls.data.synthetic.SyntheticScenes``, train and test from different seeds | generated |

VOC07 labels follow the VOC classification protocol: a class is positive (1) when the image holds a
non-difficult instance of it, ignored (``IGNORE``) when all its instances are difficult, else 0.
Ignored entries are left out of that class's AP and out of the training loss (masked BCE).
COCO keeps the images with at least one annotation (crowd included), as in multi-label COCO practice.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from pycocotools.coco import COCO
from torch.utils.data import ConcatDataset, Dataset, Subset
from torchvision.datasets.folder import default_loader, find_classes

from mls.eval.metrics import IGNORE

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

# Files each data set needs under --data: checked first, so that a missing one is named exactly.
REQUIRED = {
    "voc07": ["VOCdevkit/VOC2007/JPEGImages", "VOCdevkit/VOC2007/Annotations",
              "VOCdevkit/VOC2007/ImageSets/Main/trainval.txt", "VOCdevkit/VOC2007/ImageSets/Main/test.txt"],
    "cub200": [f"CUB_200_2011/{f}" for f in
               ("images", "images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")],
    "flowers102": ["flowers-102/jpg", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"],
    "cars": ["stanford_cars/devkit/cars_meta.mat", "stanford_cars/devkit/cars_train_annos.mat",
             "stanford_cars/cars_train", "stanford_cars/cars_test", "stanford_cars/cars_test_annos_withlabels.mat"],
    "aircraft": [f"fgvc-aircraft-2013b/data/{f}" for f in
                 ("images", "variants.txt", "images_variant_trainval.txt", "images_variant_test.txt")],
    "pets": ["oxford-iiit-pet/images", "oxford-iiit-pet/annotations/trainval.txt",
             "oxford-iiit-pet/annotations/test.txt"],
    "dtd": ["dtd/dtd/images", "dtd/dtd/labels/train1.txt", "dtd/dtd/labels/val1.txt", "dtd/dtd/labels/test1.txt"],
    "indoor67": ["Images", "TrainImages.txt", "TestImages.txt"],
    "imagefolder": ["train"],
    "coco": ["annotations/instances_train2017.json", "annotations/instances_val2017.json", "train2017", "val2017"],
    "synthetic": [],
}
DATASETS = tuple(REQUIRED)
MULTILABEL = ("voc07", "coco", "synthetic")


@dataclass
class EvalData:
    """The two splits of one classification task, its class names and its kind."""

    name: str
    train: Dataset
    test: Dataset
    classes: list[str]
    multilabel: bool


class ImageList(Dataset):
    """Images given by path, each with its target (int class or multi-hot tensor)."""

    def __init__(self, paths: list[Path], targets: list):
        self.paths, self.targets = paths, targets

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return default_loader(str(self.paths[i])), self.targets[i]


class VOC07(Dataset):
    """VOC2007 classification: torchvision's ``VOCDetection`` with its XML turned into a multi-hot target."""

    def __init__(self, root: Path, image_set: str, classes: list[str]):
        self.voc = torchvision.datasets.VOCDetection(str(root), year="2007", image_set=image_set, download=False)
        self.index = {name: i for i, name in enumerate(classes)}

    def __len__(self) -> int:
        return len(self.voc)

    def __getitem__(self, i: int):
        image, annotation = self.voc[i]
        return image, self.target(annotation["annotation"].get("object", []), self.voc.targets[i])

    def target(self, objects: list[dict], xml_path: str) -> torch.Tensor:
        """1 for a class with a non-difficult instance, IGNORE for difficult-only, else 0."""
        target = torch.zeros(len(self.index))
        for obj in objects:
            if obj["name"] not in self.index:
                raise ValueError(f"{xml_path}: object class {obj['name']!r} is not one of {list(self.index)}")
            c = self.index[obj["name"]]
            if obj.get("difficult", "0") == "1":
                target[c] = target[c] if target[c] == 1 else IGNORE
            else:
                target[c] = 1
        return target


class Transformed(Dataset):
    """A data set whose images go through ``transform`` (targets unchanged)."""

    def __init__(self, dataset: Dataset, transform: Callable):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, target = self.dataset[i]
        return self.transform(image), target


def load_dataset(name: str, data: str | None = None, image_size: int = 64, num_images: int = 512,
                 seed: int = 0) -> EvalData:
    """The (train, test) splits of data set ``name`` read from ``data``; ``image_size``, ``num_images``
    and ``seed`` only shape the generated ``synthetic`` task."""
    if name not in REQUIRED:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {name!r}")
    if name == "synthetic":
        return _synthetic(image_size, num_images, seed)
    if data is None:
        raise ValueError(f"dataset {name!r} needs --data, the folder that holds: {', '.join(REQUIRED[name])}")
    root = Path(data).expanduser()
    for rel in REQUIRED[name]:
        if not (root / rel).exists():
            raise FileNotFoundError(_missing(name, root, f"{root / rel} does not exist"))
    return _READERS[name](root)


def _missing(name: str, root: Path, what: str) -> str:
    """An error message that says what is missing and the layout ``name`` expects under ``root``."""
    return f"{name} data set under {root}: {what}; expected under --data: {', '.join(REQUIRED[name])}"


def _torchvision(name: str, root: Path, cls: type, **kwargs) -> Dataset:
    """A torchvision data set with ``download=False``, its generic "not found" error made specific."""
    try:
        return cls(str(root), download=False, **kwargs)
    except RuntimeError as error:
        raise FileNotFoundError(_missing(name, root, str(error))) from error


def _classes_of(dataset: Dataset) -> list[str]:
    """Class names of a torchvision data set, or of the first part of a concatenation."""
    return list(dataset.datasets[0].classes if isinstance(dataset, ConcatDataset) else dataset.classes)


def _split_pair(name: str, root: Path, cls: type, train: list[dict], test: dict,
                split_classes: bool = False) -> EvalData:
    """Train (one or several concatenated torchvision splits) and test of one torchvision class.

    ``split_classes``: the class numbers index each split's own class list (DTD), so all lists must agree.
    """
    parts = [_torchvision(name, root, cls, **kwargs) for kwargs in train]
    test_set = _torchvision(name, root, cls, **test)
    classes = _classes_of(parts[0])
    for kwargs, part in zip([*train, test], [*parts, test_set]):
        if split_classes and list(part.classes) != classes:
            raise ValueError(f"{name} under {root}: split {kwargs['split']} lists the classes "
                             f"{sorted(set(classes) ^ set(part.classes))} differently from {train[0]['split']}")
    train_set = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    return EvalData(name, train_set, test_set, classes, False)


class _Flowers102(torchvision.datasets.Flowers102):
    """Flowers102 that checks its label files exist rather than their md5, so re-saved copies load too."""

    def _check_integrity(self) -> bool:
        return all((self._base_folder / f).is_file() for f in ("imagelabels.mat", "setid.mat"))


def _voc07(root: Path) -> EvalData:
    main = root / "VOCdevkit/VOC2007/ImageSets/Main"
    per_class = sorted(p.name[: -len("_trainval.txt")] for p in main.glob("*_trainval.txt"))
    classes = per_class or list(VOC_CLASSES)
    return EvalData("voc07", VOC07(root, "trainval", classes), VOC07(root, "test", classes), classes, True)


def _cub200(root: Path) -> EvalData:
    base = root / "CUB_200_2011"
    read = lambda f: dict(line.split(maxsplit=1) for line in (base / f).read_text().splitlines() if line.strip())
    images, labels, is_train = read("images.txt"), read("image_class_labels.txt"), read("train_test_split.txt")
    classes = [c.strip() for _, c in sorted(read("classes.txt").items(), key=lambda kv: int(kv[0]))]
    split = {"1": ([], []), "0": ([], [])}
    for image_id, rel in images.items():
        paths, targets = split[is_train[image_id].strip()]
        paths.append(base / "images" / rel.strip())
        targets.append(int(labels[image_id]) - 1)
    return EvalData("cub200", ImageList(*split["1"]), ImageList(*split["0"]), classes, False)


def _indoor67(root: Path) -> EvalData:
    classes, index = find_classes(str(root / "Images"))

    def listed(file: str) -> ImageList:
        rels = [line.strip() for line in (root / file).read_text().splitlines() if line.strip()]
        unknown = sorted({r.split("/")[0] for r in rels} - set(index))
        if unknown:
            raise FileNotFoundError(_missing("indoor67", root, f"{file} names classes without an Images/ folder: "
                                                              f"{unknown}"))
        return ImageList([root / "Images" / r for r in rels], [index[r.split("/")[0]] for r in rels])

    return EvalData("indoor67", listed("TrainImages.txt"), listed("TestImages.txt"), classes, False)


def _imagefolder(root: Path) -> EvalData:
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if test_dir is None:
        raise FileNotFoundError(_missing("imagefolder", root, "neither test/ nor val/ exists beside train/"))
    train, test = (torchvision.datasets.ImageFolder(str(d)) for d in (root / "train", test_dir))
    if train.classes != test.classes:
        raise ValueError(f"imagefolder: class folders differ between {root / 'train'} and {test_dir}")
    return EvalData("imagefolder", train, test, train.classes, False)


def coco_labels(annotations: Path, images: Path) -> tuple[ImageList, list[str]]:
    """The images of a COCO instances json (those with at least one annotation, crowd included), under
    ``images``, each with its multi-hot target, and the category names in category-id order."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its loading times
        coco = COCO(str(annotations))
    cat_ids = sorted(coco.getCatIds())
    index = {cat: i for i, cat in enumerate(cat_ids)}
    paths, targets = [], []
    for image_id in sorted(coco.getImgIds()):
        cats = {ann["category_id"] for ann in coco.imgToAnns[image_id]}
        if cats:
            paths.append(images / coco.imgs[image_id]["file_name"])
            targets.append(torch.zeros(len(cat_ids)).index_fill_(0, torch.tensor([index[c] for c in cats]), 1))
    return ImageList(paths, targets), [cat["name"] for cat in coco.loadCats(cat_ids)]


def _coco(root: Path) -> EvalData:
    (train, classes), (test, test_classes) = (coco_labels(root / f"annotations/instances_{name}.json", root / name)
                                              for name in ("train2017", "val2017"))
    if classes != test_classes:
        raise ValueError("coco: the categories of instances_train2017.json and instances_val2017.json differ")
    return EvalData("coco", train, test, classes, True)


def validation_split(data: EvalData, share: float = 0.2) -> EvalData:
    """Train on the first ``1 - share`` of the training images, test on the rest: settings are chosen
    on this split, so that the test split is read once, for the finalists."""
    n = len(data.train)
    cut = n - max(1, round(share * n))
    if cut < 1:
        raise ValueError(f"{data.name}: {n} training images are too few to carve a validation split")
    return EvalData(f"{data.name}-val", Subset(data.train, range(cut)), Subset(data.train, range(cut, n)),
                    data.classes, data.multilabel)


def _synthetic(image_size: int, num_images: int, seed: int) -> EvalData:
    from mls.data.synthetic import CLASSES, SyntheticScenes

    train = SyntheticScenes(num_images=num_images, image_size=image_size, seed=seed)
    test = SyntheticScenes(num_images=max(num_images // 2, 1), image_size=image_size, seed=seed + 1_000_003)
    return EvalData("synthetic", train, test, list(CLASSES), True)


_READERS: dict[str, Callable[[Path], EvalData]] = {
    "voc07": _voc07,
    "cub200": _cub200,
    "flowers102": lambda root: _split_pair("flowers102", root, _Flowers102, [{"split": "train"}, {"split": "val"}],
                                           {"split": "test"}),
    "cars": lambda root: _split_pair("cars", root, torchvision.datasets.StanfordCars, [{"split": "train"}],
                                     {"split": "test"}),
    "aircraft": lambda root: _split_pair("aircraft", root, torchvision.datasets.FGVCAircraft,
                                         [{"split": "trainval", "annotation_level": "variant"}],
                                         {"split": "test", "annotation_level": "variant"}),
    "pets": lambda root: _split_pair("pets", root, torchvision.datasets.OxfordIIITPet, [{"split": "trainval"}],
                                     {"split": "test"}),
    "dtd": lambda root: _split_pair("dtd", root, torchvision.datasets.DTD,
                                    [{"split": "train"}, {"split": "val"}], {"split": "test"}, split_classes=True),
    "indoor67": _indoor67,
    "imagefolder": _imagefolder,
    "coco": _coco,
}
