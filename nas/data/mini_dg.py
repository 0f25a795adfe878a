"""The offline domain-generalisation targets of mini-VTAB's ``mnist5k`` (issue 23), in the
spirit of NOAH's ImageNet protocol (train on ImageNet; test unchanged on ImageNet-V2, -Sketch,
-A and -R): the source is ``mnist5k``; its targets are test sets of the same ten digit classes
from shifted domains, none holding an image of the source's splits.

- ``uci_digits``: scikit-learn's 8x8 UCI digits, upscaled; another collection and renderer
  (10 classes; the counterpart of ImageNet-V2);
- ``inverted``: MNIST digits the source never saw, dark on light (10 classes);
- ``noisy``: MNIST digits the source never saw, with Gaussian pixel noise of sd 80 (10);
- ``sketch``: outlines of MNIST digits the source never saw, digits 0-4 only (5 of 10
  classes, as ImageNet-R and -A cover 200 of ImageNet's 1,000).
"""

from __future__ import annotations

import numpy as np

from nas.data.hashing import image_fingerprints
from nas.data.mini_vtab_base import dedupe, resize

#: Each MNIST-derived target's size (at most; the pool left after the splits is shared).
TARGET_SIZE = 500
NOISE_SD = 80.0
SKETCH_CLASSES = (0, 1, 2, 3, 4)
MNIST_TARGETS = ("uci_digits", "inverted", "noisy", "sketch")


def invert(images: np.ndarray) -> np.ndarray:
    return (255 - images).astype(np.uint8)


def add_noise(images: np.ndarray, rng: np.random.Generator, sd: float = NOISE_SD) -> np.ndarray:
    noisy = images.astype(np.float64) + rng.normal(0.0, sd, images.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _neighbourhood(mask: np.ndarray, reduce) -> np.ndarray:
    """``reduce`` (np.maximum or np.minimum) over each pixel's 3x3 neighbourhood."""
    pad = np.pad(mask, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = mask.shape[1:]
    out = pad[:, 1 : h + 1, 1 : w + 1].copy()
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out = reduce(out, pad[:, dy : dy + h, dx : dx + w])
    return out


def sketch(images: np.ndarray) -> np.ndarray:
    """Edge-only renderings: the outline (dilation minus erosion) of each binarised digit."""
    ink = images >= 128
    edges = _neighbourhood(ink, np.maximum) & ~_neighbourhood(ink, np.minimum)
    return (edges * 255).astype(np.uint8)


def uci_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 UCI digits (8x8, 17 grey levels) upscaled to 28x28."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = resize((d.images * (255.0 / 16.0)).round().astype(np.uint8))
    return dedupe(images, d.target.astype(np.int64))


def mnist_targets(
    images: np.ndarray,
    labels: np.ndarray,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    rng: np.random.Generator,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The four targets of ``mnist5k``, from the MNIST images its splits did not take (none
    when a test split above about 3,500 images leaves fewer than 300)."""
    images, labels = dedupe(images, labels)
    used = np.concatenate([image_fingerprints(x) for x, _ in splits.values()])
    free = ~np.isin(image_fingerprints(images), used)
    pool, pool_labels = images[free], labels[free]
    order = rng.permutation(len(pool))
    per = min(TARGET_SIZE, len(order) // 3)
    if per < 100:  # a test split this large leaves too few: the task ships no targets
        return {}
    parts = [order[:per], order[per : 2 * per], order[2 * per :]]
    sketch_part = [i for i in parts[2] if pool_labels[i] in SKETCH_CLASSES][:per]
    return {
        "uci_digits": uci_digits(),
        "inverted": (invert(pool[parts[0]]), pool_labels[parts[0]]),
        "noisy": (add_noise(pool[parts[1]], rng), pool_labels[parts[1]]),
        "sketch": (sketch(pool[sketch_part]), pool_labels[sketch_part]),
    }
