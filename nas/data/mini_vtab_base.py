"""What every mini-VTAB task shares: the image size, the 800/200 split sizes, a task's data, and
how a pool of images becomes distinct train/val/test splits."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from nas.core.errors import NasError
from nas.data.hashing import image_fingerprints

SIZE = 28


TRAIN = 800


VAL = 200

#: The development test split (``devtest``, issue 37): images none of the other splits (nor a
#: target) holds, drawn after them so that they are unchanged, for design decisions; the
#: reported ``test`` split is then touched once per table. Tasks whose source is used up by
#: the other splits (digits, mnist5k, textures, elpv) have none.
DEV = 1000


@dataclass
class TaskData:
    """Images (N, 28, 28) uint8 per split, with labels and class names."""

    group: str
    class_names: list[str]
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    source: str
    licence: str
    #: domain-generalisation test sets in the task's label space, written to targets/<name>.txt
    targets: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def resize(images: np.ndarray, size: int = SIZE) -> np.ndarray:
    out = [
        np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC))
        for im in images
    ]
    return np.stack(out).astype(np.uint8)


def dedupe(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep the first of identical images; drop every copy of an image given two labels."""
    prints = image_fingerprints(images)
    first: dict[int, int] = {}
    conflicting: set[int] = set()
    for i, fp in enumerate(prints.tolist()):
        if fp in first:
            if labels[first[fp]] != labels[i]:
                conflicting.add(fp)
            continue
        first[fp] = i
    keep = [i for fp, i in first.items() if fp not in conflicting]
    keep.sort()
    return images[keep], labels[keep]


def random_splits(
    images: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    test_size: int,
    dev_size: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train / val / test (and ``devtest`` of up to ``dev_size`` of the images left after
    them: no randomness of its own, so the other splits stay what they were)."""
    images, labels = dedupe(images, labels)
    if len(images) < TRAIN + VAL + 1:
        raise NasError(f"only {len(images)} distinct images; need more than {TRAIN + VAL}")
    order = rng.permutation(len(images))
    parts = {
        "train": order[:TRAIN],
        "val": order[TRAIN : TRAIN + VAL],
        "test": order[TRAIN + VAL : TRAIN + VAL + test_size],
    }
    rest = order[TRAIN + VAL + test_size : TRAIN + VAL + test_size + dev_size]
    if len(rest):
        parts["devtest"] = rest
    return {k: (images[v], labels[v]) for k, v in parts.items()}
