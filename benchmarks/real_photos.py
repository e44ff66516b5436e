"""A real-photo development set: photographed objects placed on photographed backgrounds.

Every threshold and recommendation of mls is checked on this set beside the built-in scenes. Its pictures
are photographs served by Debian's package archive, never drawn by the built-in scenes' generator:

- objects: the photographic stamps of ``tuxpaint-stamps-default`` (cut-out photographs of animals, fruit,
  vegetables, flowers, tools, vehicles, instruments, ..., with an alpha channel; GPL-2), grouped into 12
  classes by their folder (``CLASSES``); drawings are left out (folders named ``cartoon``, symbols, road
  signs, flags, and any stamp of fewer than ``PHOTO_COLOURS`` colours);
- backgrounds: the 12 nature photographs of ``mate-backgrounds`` (``backgrounds/mate/nature``; GPL-2+).

Each image is a random crop of one background with 2 to 4 objects pasted on it (scaled, flipped, placed at
random; later ones may hide part of earlier ones); its labels are the classes of its objects and its boxes
their extents. The split is fixed by names, not by the draw: a quarter of each class's stamps (every stamp
whose name hashes to 0 mod 4) and 3 of the 12 backgrounds are *held out*, and appear only in the held-out
part. Written under ``--out``:

    pretrain/NNNNN.jpg                      the tuning part's unlabelled pretraining images (``mls pretrain --data``)
    pretrain.json                           their labels and boxes, COCO format (``mls pretrain --annotations``)
    tuning/VOCdevkit/VOC2007/...            new images of the tuning objects and backgrounds, labelled:
                                            ``mls eval linear --dataset voc07 --data OUT/tuning`` (trainval -> test)
    heldout/VOCdevkit/VOC2007/...           images of the held-out objects on the held-out backgrounds, same layout
    tuning/coco, heldout/coco               the same images in COCO's layout (``--dataset coco``)
    sources.json                            every stamp and background: package, version, licence, class, part

Settings are chosen on the tuning part (its validation split); the held-out part is read for the finalists.

    apt-get install tuxpaint-stamps-default mate-backgrounds     # or let the script fetch them with apt-get download
    python benchmarks/real_photos.py --out datasets/photos       # about a minute on 2 cores
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

PACKAGES = {"tuxpaint-stamps-default": "GPL-2", "mate-backgrounds": "GPL-2+"}
STAMPS = "usr/share/tuxpaint/stamps"
BACKGROUNDS = "usr/share/backgrounds/mate/nature"
# class -> the stamp folders it is made of (first path parts under the stamps folder)
CLASSES = {
    "mammal": ("animals/mammals", "animals/marsupials"),
    "bird": ("animals/birds",),
    "sea_life": ("animals/fish", "animals/shellfish"),
    "insect": ("animals/insects",),
    "fruit": ("food/fruit", "food/nuts"),
    "vegetable": ("food/vegetables",),
    "flower": ("plants/flowers",),
    "plant": ("plants/trees", "plants/mushrooms", "plants/"),
    "household": ("household/",),
    "vehicle": ("vehicles/", "military/vehicles"),
    "instrument": ("hobbies/music",),
    "sports": ("sports/",),
}
DRAWN = ("cartoon", "symbols/", "town/roadsigns", "town/flags")
PHOTO_COLOURS = 600  # distinct RGBA values in a 64 x 64 thumbnail: drawings have far fewer
HELD_OUT_BACKGROUNDS = 3


@dataclass
class Stamp:
    path: str  # relative to the stamps folder
    label: str
    part: str  # tuning or heldout
    image: Image.Image  # RGBA, cropped to its visible pixels


def held_out(name: str, modulus: int) -> bool:
    """A stable draw by name: the same files are held out on every machine and for every seed."""
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % modulus == 0


def package_version(name: str) -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def find_sources(cache: Path, given: dict[str, str | None]) -> tuple[Path, Path, dict]:
    """The stamps and backgrounds folders: ``given`` ones, installed ones, or extracted from ``apt-get download``
    into ``cache``."""
    roots, versions = {}, {}
    for package, folder in (("tuxpaint-stamps-default", STAMPS), ("mate-backgrounds", BACKGROUNDS)):
        installed = Path("/") / folder
        if given.get(package):
            roots[package], versions[package] = Path(given[package]), "given"
            continue
        if installed.is_dir():
            roots[package], versions[package] = installed, package_version(package)
            continue
        target = cache / package
        if not (target / folder).is_dir():
            print(f"{package} is not installed: fetching it with apt-get download into {cache}", flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                got = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
                debs = list(Path(tmp).glob(f"{package}_*.deb"))
                if got.returncode != 0 or not debs:
                    sys.exit(f"real_photos: error: could not fetch {package} ({got.stderr.strip()[-200:]}); "
                             f"install it with: apt-get install {package}")
                target.mkdir(parents=True, exist_ok=True)
                subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(target)], check=True)
                (target / "VERSION").write_text(debs[0].name.split("_")[1])
        roots[package] = target / folder
        versions[package] = (target / "VERSION").read_text().strip()
    return roots["tuxpaint-stamps-default"], roots["mate-backgrounds"], versions


def class_of(rel: str) -> str | None:
    if any(part in rel for part in DRAWN):
        return None
    for label, prefixes in CLASSES.items():
        for prefix in prefixes:
            # "plants/" alone means files directly in plants/, not in its sub-folders
            if prefix.endswith("/") and rel.startswith(prefix) and (rel.count("/") == 1 or prefix != "plants/"):
                return label
            if not prefix.endswith("/") and rel.startswith(prefix + "/"):
                return label
    return None


def is_photo(image: Image.Image) -> bool:
    return len(image.resize((64, 64)).getcolors(64 * 64)) >= PHOTO_COLOURS


def load_stamps(root: Path) -> list[Stamp]:
    stamps = []
    for path in sorted(root.rglob("*.png")):
        rel = path.relative_to(root).as_posix()
        label = class_of(rel)
        if label is None:
            continue
        image = Image.open(path).convert("RGBA")
        box = image.getchannel("A").getbbox()
        if box is None or not is_photo(image):
            continue
        stamps.append(Stamp(rel, label, "heldout" if held_out(rel, 4) else "tuning", image.crop(box)))
    return stamps


def load_backgrounds(root: Path) -> dict[str, list[tuple[str, Image.Image]]]:
    files = sorted(root.glob("*.jpg"))
    ranked = sorted(files, key=lambda p: hashlib.sha1(p.name.encode()).hexdigest())
    out = {"tuning": [], "heldout": []}
    for path in files:
        part = "heldout" if path in ranked[:HELD_OUT_BACKGROUNDS] else "tuning"
        out[part].append((path.name, Image.open(path).convert("RGB")))
    return out


def compose(rng: random.Random, size: int, backgrounds: list, stamps: list[Stamp]) -> tuple[Image.Image, list]:
    """One scene: a crop of a background with 2-4 objects on it; returns the image and its (label, box) list."""
    _, photo = rng.choice(backgrounds)
    side = int(min(photo.size) * rng.uniform(0.2, 0.7))
    x, y = rng.randrange(photo.width - side + 1), rng.randrange(photo.height - side + 1)
    canvas = photo.crop((x, y, x + side, y + side)).resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
        canvas = ImageOps.mirror(canvas)
    objects = []
    for stamp in rng.sample(stamps, rng.randint(2, 4)):
        longest = rng.uniform(0.3, 0.65) * size
        scale = longest / max(stamp.image.size)
        w, h = max(4, round(stamp.image.width * scale)), max(4, round(stamp.image.height * scale))
        thing = stamp.image.resize((w, h), Image.LANCZOS)
        if rng.random() < 0.5:
            thing = ImageOps.mirror(thing)
        left, top = rng.randint(-w // 4, size - 3 * w // 4), rng.randint(-h // 4, size - 3 * h // 4)
        canvas.paste(thing, (left, top), thing)
        box = (max(0, left), max(0, top), min(size, left + w), min(size, top + h))
        objects.append((stamp.label, box))
    return canvas, objects


def voc_xml(name: str, size: int, objects: list) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = f"{name}.jpg"
    dims = ET.SubElement(root, "size")
    for tag, value in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(dims, tag).text = str(value)
    for label, (x0, y0, x1, y1) in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = label
        ET.SubElement(obj, "difficult").text = "0"
        box = ET.SubElement(obj, "bndbox")
        for tag, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(box, tag).text = str(value)
    return ET.tostring(root)


def coco_json(names: list[str], size: int, annotations: list[list]) -> dict:
    labels = list(CLASSES)
    images, anns = [], []
    for image_id, (name, objects) in enumerate(zip(names, annotations), start=1):
        images.append({"id": image_id, "file_name": f"{name}.jpg", "width": size, "height": size})
        for label, (x0, y0, x1, y1) in objects:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": labels.index(label) + 1,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    return {"images": images, "annotations": anns,
            "categories": [{"id": i + 1, "name": name} for i, name in enumerate(labels)]}


def write_scenes(rng: random.Random, count: int, size: int, backgrounds: list, stamps: list[Stamp],
                 folder: Path) -> tuple[list[str], list[list]]:
    folder.mkdir(parents=True, exist_ok=True)
    names, annotations = [], []
    for i in range(count):
        image, objects = compose(rng, size, backgrounds, stamps)
        name = f"{i:05d}"
        image.save(folder / f"{name}.jpg", quality=92)
        names.append(name)
        annotations.append(objects)
    return names, annotations


def write_labelled_part(out: Path, names: list[str], annotations: list[list], size: int, test_share: float) -> None:
    """The VOC2007 layout ``mls eval --dataset voc07`` reads, and the same images in COCO's layout."""
    voc = out / "VOCdevkit/VOC2007"
    main = voc / "ImageSets/Main"
    (voc / "Annotations").mkdir(parents=True, exist_ok=True)
    main.mkdir(parents=True, exist_ok=True)
    for name, objects in zip(names, annotations):
        (voc / "Annotations" / f"{name}.xml").write_bytes(voc_xml(name, size, objects))
    cut = len(names) - round(test_share * len(names))
    splits = {"trainval": range(cut), "test": range(cut, len(names))}
    for split, rows in splits.items():
        (main / f"{split}.txt").write_text("".join(f"{names[i]}\n" for i in rows))
        for label in CLASSES:  # VOC's per-class lists, from which mls reads the class names
            (main / f"{label}_{split}.txt").write_text("".join(
                f"{names[i]} {1 if any(o[0] == label for o in annotations[i]) else -1}\n" for i in rows))
    coco = out / "coco"
    for split, folder in (("trainval", "train2017"), ("test", "val2017")):
        rows = list(splits[split])
        (coco / folder).mkdir(parents=True, exist_ok=True)
        for i in rows:
            shutil.copyfile(voc / "JPEGImages" / f"{names[i]}.jpg", coco / folder / f"{names[i]}.jpg")
        (coco / "annotations").mkdir(exist_ok=True)
        (coco / "annotations" / f"instances_{folder}.json").write_text(json.dumps(
            coco_json([names[i] for i in rows], size, [annotations[i] for i in rows])))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write (must not exist or be empty)")
    parser.add_argument("--size", type=int, default=96, help="side of each image in pixels")
    parser.add_argument("--pretrain", type=int, default=3000, help="unlabelled pretraining images (tuning part)")
    parser.add_argument("--probe", type=int, default=1000, help="labelled images of each part (tuning, held-out)")
    parser.add_argument("--test-share", type=float, default=0.2, help="share of each labelled part in its test list")
    parser.add_argument("--seed", type=int, default=0, help="seed of the compositions (not of the split)")
    parser.add_argument("--cache", default=str(Path.home() / ".cache/mls/debs"), help="where fetched packages go")
    parser.add_argument("--stamps", help=f"a folder laid out as /{STAMPS} (default: the installed or fetched package)")
    parser.add_argument("--backgrounds", help=f"a folder of .jpg photographs (default: /{BACKGROUNDS})")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"real_photos: error: --out {out} is not empty")
    stamp_root, background_root, versions = find_sources(
        Path(args.cache), {"tuxpaint-stamps-default": args.stamps, "mate-backgrounds": args.backgrounds})
    stamps, backgrounds = load_stamps(stamp_root), load_backgrounds(background_root)
    by_part = {part: [s for s in stamps if s.part == part] for part in ("tuning", "heldout")}
    for part, chosen in by_part.items():
        missing = sorted(set(CLASSES) - {s.label for s in chosen})
        if missing:
            sys.exit(f"real_photos: error: the {part} part has no photographic stamp of {missing}")
    rng = random.Random(args.seed)
    names, annotations = write_scenes(rng, args.pretrain, args.size, backgrounds["tuning"], by_part["tuning"],
                                      out / "pretrain")
    (out / "pretrain.json").write_text(json.dumps(coco_json(names, args.size, annotations)))
    for part in ("tuning", "heldout"):
        folder = out / part / "VOCdevkit/VOC2007/JPEGImages"
        names, annotations = write_scenes(rng, args.probe, args.size, backgrounds[part], by_part[part], folder)
        write_labelled_part(out / part, names, annotations, args.size, args.test_share)
    sources = {
        "packages": {name: {"version": versions[name], "licence": licence} for name, licence in PACKAGES.items()},
        "classes": {label: list(prefixes) for label, prefixes in CLASSES.items()},
        "stamps": [{"file": s.path, "class": s.label, "part": s.part} for s in stamps],
        "backgrounds": [{"file": name, "part": part} for part, items in backgrounds.items() for name, _ in items],
        "settings": vars(args),
    }
    (out / "sources.json").write_text(json.dumps(sources, indent=1))
    counts = {part: len(chosen) for part, chosen in by_part.items()}
    print(f"wrote {out}: {args.pretrain} pretraining images, {args.probe} labelled images in each part; "
          f"{len(stamps)} photographic stamps in {len(CLASSES)} classes ({counts['tuning']} tuning, "
          f"{counts['heldout']} held out), backgrounds {len(backgrounds['tuning'])} tuning, "
          f"{len(backgrounds['heldout'])} held out")


if __name__ == "__main__":
    main()
