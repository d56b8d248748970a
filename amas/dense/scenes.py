"""The generated scenes benchmark: Fashion-MNIST items pasted at random positions and scales on square canvases,
written as semantic segmentation (VOC layout) and as detection (COCO JSON).

Conventions. Segmentation: class 0 is the background, classes 1..10 are the Fashion-MNIST classes 0..9 plus one,
255 (ignore) marks a 1-pixel ring where two instances meet (on the background's or the covered object's side, as
VOC marks object borders). Detection: labels are the same 1..10 (0 is the background, as torchvision's detectors
expect); a box is the tight box of the object's visible pixels in COCO [x, y, width, height], pixel edges.
An object's pixels are its resized item's pixels above THRESHOLD, so masks follow the garment's shape; a later paste
covers an earlier one, and a paste that would leave an earlier object less than MIN_VISIBLE of its pixels is drawn
again (up to TRIES times, then the object is left out). Train and val draw disjoint Fashion-MNIST training items,
test draws Fashion-MNIST test items (a split whose pool runs out reuses its own items, never another split's); every
split has its own random stream, so the counts of the others do not change it.

    out/voc/JPEGImages/<split>_000000.png, SegmentationClass/<same>.png, ImageSets/Segmentation/<split>.txt
    out/coco/images/<split>_000000.png (hard links to the VOC images where the file system allows), and
    out/coco/annotations/instances_<split>.json (annotations carry their Fashion-MNIST item index as "item")
    out/scenes.json   (the settings, counts and conventions)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from amas.errors import DataError

__all__ = ["CLASSES", "Scene", "make_scenes", "render_scene", "voc_palette"]

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
THRESHOLD = 25
MIN_VISIBLE = 0.5
TRIES = 20
SPLITS = ("train", "val", "test")


@dataclass
class Scene:
    """One canvas: RGB image (H, W, 3) uint8, label map (H, W) uint8 (0 background, 1..10, 255 ignore), and per
    object its label, box (x1, y1, x2, y2) in pixel edges, paste square (x, y, side), visible area and item index."""

    image: np.ndarray
    labels: np.ndarray
    objects: list[dict] = field(default_factory=list)


def voc_palette() -> list[int]:
    """PASCAL VOC's 256-colour palette, flat [r, g, b, ...] (class k's colour; 255 is cream)."""
    out = []
    for k in range(256):
        r = g = b = 0
        c = k
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out += [r, g, b]
    return out


def render_scene(items: np.ndarray, classes: np.ndarray, rng: np.random.Generator, size: int,
                 scale: tuple[int, int], item_ids: list[int] | None = None) -> Scene:
    """Paste items (k, 28, 28) uint8 of Fashion-MNIST classes (k,) on one size × size canvas drawn from rng."""
    from PIL import Image

    lo, hi = scale
    image = (rng.integers(0, 60, 3)[None, None, :] + rng.integers(0, 25, (size, size, 3))).astype(np.uint8)
    instance = np.zeros((size, size), dtype=np.int32)
    placed: list[dict] = []
    for k, item in enumerate(items):
        for _ in range(TRIES):
            side = int(rng.integers(lo, hi + 1))
            x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
            tint = rng.uniform(0.45, 1.0, 3)
            patch = np.asarray(Image.fromarray(np.ascontiguousarray(item)).resize((side, side), Image.BILINEAR))
            mask = patch > THRESHOLD
            trial = instance.copy()
            trial[y:y + side, x:x + side][mask] = len(placed) + 1
            if mask.any() and all((trial == j + 1).sum() >= MIN_VISIBLE * o["pasted"] for j, o in enumerate(placed)):
                instance = trial
                colour = (patch[..., None] * tint[None, None, :]).astype(np.uint8)
                image[y:y + side, x:x + side][mask] = colour[mask]
                placed.append({"label": int(classes[k]) + 1, "paste": [x, y, side], "pasted": int(mask.sum()),
                               "item": int(item_ids[k]) if item_ids is not None else k})
                break
    lut = np.array([0] + [o["label"] for o in placed], dtype=np.uint8)
    labels = lut[instance]
    # 255 on a 1-pixel ring: a pixel with a 4-neighbour of a later instance (background is instance 0)
    padded = np.pad(instance, 1, mode="edge")
    later = np.maximum.reduce([padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
    labels[later > instance] = 255
    objects = []
    for j, o in enumerate(placed):
        rows, cols = np.nonzero(instance == j + 1)
        box = [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]
        objects.append({"label": o["label"], "box": box, "paste": o["paste"], "area": int(rows.size),
                        "item": o["item"]})
    return Scene(image, labels, objects)


def _check_args(counts: dict[str, int], size: int, scale: tuple[int, int], objects: tuple[int, int]) -> None:
    if any(n < 0 for n in counts.values()) or not any(counts.values()):
        raise DataError(f"scene counts {counts} make no images; pass a positive --train, --val or --test")
    if not 4 <= scale[0] <= scale[1] <= size:
        raise DataError(f"item scale {list(scale)} does not fit a {size}-pixel canvas; pass 4 <= min <= max <= size")
    if not 1 <= objects[0] <= objects[1]:
        raise DataError(f"objects per image {list(objects)} is not a range; pass 1 <= min <= max, e.g. 1 4")
    if objects[1] * counts["val"] >= 60_000:
        raise DataError(f"{counts['val']} val images of up to {objects[1]} items leave no Fashion-MNIST training "
                        "items for train; lower --val")


def _write_png(path: Path, array: np.ndarray, palette: list[int] | None = None) -> None:
    from PIL import Image

    im = Image.fromarray(array)
    if palette is not None:
        im = im.convert("P")
        im.putpalette(palette)
    im.save(path)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _coco(split: str, scenes: list[tuple[str, Scene]], size: int) -> dict:
    images, annotations = [], []
    for image_id, (name, scene) in enumerate(scenes, start=1):
        images.append({"id": image_id, "file_name": f"{name}.png", "width": size, "height": size})
        for o in scene.objects:
            x1, y1, x2, y2 = o["box"]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": o["label"],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": o["area"], "iscrowd": 0,
                                "item": o["item"]})
    categories = [{"id": k + 1, "name": n, "supercategory": "fashion"} for k, n in enumerate(CLASSES)]
    info = {"description": f"amas generated scenes, {split} split (Fashion-MNIST items on {size}x{size} canvases)"}
    return {"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": categories}


def make_scenes(out: str | Path, train: int, val: int, test: int, size: int = 96, seed: int = 0,
                scale: tuple[int, int] | None = None, objects: tuple[int, int] = (1, 4),
                fmnist_root: str = "") -> dict:
    """Write the scenes benchmark under out (VOC layout in out/voc, COCO JSON in out/coco) and return its manifest,
    also written to out/scenes.json; the same arguments write the same files."""
    from amas.config import DataConfig
    from amas.datasets import load_tensors

    counts = {"train": int(train), "val": int(val), "test": int(test)}
    scale = tuple(scale) if scale is not None else (max(4, round(size * 5 / 24)), size // 2)
    _check_args(counts, size, scale, tuple(objects))
    cfg = DataConfig(name="fashion_mnist", root=fmnist_root)
    fm_train, fm_test = load_tensors(cfg, train=True), load_tensors(cfg, train=False)
    perm = np.random.default_rng([seed, 7]).permutation(len(fm_train[1]))
    n_val = objects[1] * counts["val"]
    pools = {"train": (fm_train, perm[: len(perm) - n_val]), "val": (fm_train, perm[len(perm) - n_val:]),
             "test": (fm_test, np.random.default_rng([seed, 8]).permutation(len(fm_test[1])))}
    out = Path(out).expanduser()
    voc, coco = out / "voc", out / "coco"
    for d in (voc / "JPEGImages", voc / "SegmentationClass", voc / "ImageSets" / "Segmentation", coco / "images",
              coco / "annotations"):
        d.mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    for s, split in enumerate(SPLITS):
        (x, y), pool = pools[split]
        x, y = x[:, 0].numpy(), y.numpy()
        rng = np.random.default_rng([seed, s])
        cursor, scenes = 0, []
        for i in range(counts[split]):
            k = int(rng.integers(objects[0], objects[1] + 1))
            ids = [int(pool[(cursor + j) % len(pool)]) for j in range(k)]
            cursor += k
            scene = render_scene(x[ids], y[ids], rng, size, scale, item_ids=ids)
            name = f"{split}_{i:06d}"
            _write_png(voc / "JPEGImages" / f"{name}.png", scene.image)
            _write_png(voc / "SegmentationClass" / f"{name}.png", scene.labels, palette)
            _link_or_copy(voc / "JPEGImages" / f"{name}.png", coco / "images" / f"{name}.png")
            scenes.append((name, scene))
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{n}\n" for n, _ in scenes))
        (coco / "annotations" / f"instances_{split}.json").write_text(json.dumps(_coco(split, scenes, size)))
    manifest = {"seed": seed, "size": size, "scale": list(scale), "objects": list(objects), "counts": counts,
                "classes": ["background", *CLASSES], "threshold": THRESHOLD, "min_visible": MIN_VISIBLE,
                "ignore_index": 255, "voc": "voc", "coco": "coco",
                "convention": "segmentation: 0 background, 1..10 Fashion-MNIST class + 1, 255 ignore (1-px ring); "
                              "detection: labels 1..10, 0 reserved for the background; boxes COCO [x, y, w, h]"}
    (out / "scenes.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
