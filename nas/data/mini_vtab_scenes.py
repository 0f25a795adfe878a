"""The generated mini-VTAB tasks: shapes drawn with PIL from a seeded generator (dSprites-style
location and orientation, CLEVR-style counting) and the CLIP probe scenes, none equal to an
image the offline CLIP was trained with."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from nas.core.errors import NasError
from nas.data import scenes
from nas.data.hashing import image_fingerprints
from nas.data.mini_vtab_base import DEV, SIZE, TRAIN, VAL, TaskData, random_splits

LOC_NAMES = (
    "far left", "left", "left of center", "center", "right of center", "right", "far right",
)  # fmt: skip


# image y points down, so angles grow clockwise from "right"
ORI_NAMES = (
    "right", "lower right", "down", "lower left", "left", "upper left", "up", "upper right",
)  # fmt: skip


COUNT_NAMES = (
    "one shape",
    "two shapes",
    "three shapes",
    "four shapes",
    "five shapes",
    "six shapes",
)


SUPER = 4  # draw at 4x and downsample, for anti-aliased edges


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("L", (SIZE * SUPER, SIZE * SUPER), 0)
    return img, ImageDraw.Draw(img)


def _finish(img: Image.Image) -> np.ndarray:
    return np.asarray(img.resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.uint8)


def _shape(
    draw: ImageDraw.ImageDraw,
    kind: int,
    cx: float,
    cy: float,
    r: float,
    value: int,
    angle: float = 0.0,
) -> None:
    s = SUPER
    if kind == 0:  # disc
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=value)
        return
    sides = 4 if kind == 1 else 3
    pts = [
        (
            (cx + r * math.cos(angle + 2 * math.pi * k / sides)) * s,
            (cy + r * math.sin(angle + 2 * math.pi * k / sides)) * s,
        )
        for k in range(sides)
    ]
    draw.polygon(pts, fill=value)


def _generate(
    make: Callable[[np.random.Generator, int], np.ndarray],
    classes: int,
    rng: np.random.Generator,
    test_size: int,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Balanced labels; images regenerated until all are distinct. The development test split
    (``devtest``) is generated after the others, which stay what they were without it."""
    seen: set[int] = set()
    draws = _distinct(make, classes, rng, TRAIN + VAL + test_size, seen, 0)
    splits = random_splits(draws[0], draws[1], rng, test_size)
    splits["devtest"] = _distinct(make, classes, rng, DEV, seen, draws[2])[:2]
    return splits


def _distinct(
    make: Callable[[np.random.Generator, int], np.ndarray],
    classes: int,
    rng: np.random.Generator,
    count: int,
    seen: set[int],
    start: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """``count`` generated images none of ``seen`` holds (added to it), labels cycling over the
    classes from draw ``start``; and the draw after the last."""
    images, labels = [], []
    i = start
    while len(images) < count:
        label = i % classes
        i += 1
        image = make(rng, label)
        fp = int(image_fingerprints(image[None])[0])
        if fp in seen:
            continue
        seen.add(fp)
        images.append(image)
        labels.append(label)
    return np.stack(images), np.array(labels, dtype=np.int64), i


LOC_BINS = len(LOC_NAMES)


def dsprite_location(rng: np.random.Generator, label: int) -> np.ndarray:
    img, draw = _canvas()
    # Centres span [4, 24] in LOC_BINS equal bins; radii <= 3.5 keep every shape in frame.
    r = float(rng.uniform(2.0, 3.5))
    width = (SIZE - 8) / LOC_BINS
    cx = 4 + float(rng.uniform(label * width, (label + 1) * width))
    cy = float(rng.uniform(4, SIZE - 4))
    _shape(draw, int(rng.integers(0, 3)), cx, cy, r, 255, float(rng.uniform(0, 2 * math.pi)))
    return _finish(img)


ORI_BINS = len(ORI_NAMES)


def dsprite_orientation(rng: np.random.Generator, label: int) -> np.ndarray:
    img, draw = _canvas()
    angle = (label + float(rng.uniform(0.1, 0.9))) * 2 * math.pi / ORI_BINS
    length = float(rng.uniform(6, 9))
    cx, cy = (float(rng.uniform(length + 1, SIZE - length - 1)) for _ in range(2))
    tip = (cx + length * math.cos(angle), cy + length * math.sin(angle))
    back = angle + math.pi
    half = float(rng.uniform(2.0, 3.0))
    base = (cx + 0.6 * length * math.cos(back), cy + 0.6 * length * math.sin(back))
    left = (
        base[0] + half * math.cos(back + math.pi / 2),
        base[1] + half * math.sin(back + math.pi / 2),
    )
    right = (
        base[0] + half * math.cos(back - math.pi / 2),
        base[1] + half * math.sin(back - math.pi / 2),
    )
    draw.polygon([(x * SUPER, y * SUPER) for x, y in (tip, left, right)], fill=255)
    return _finish(img)


COUNT_MAX = len(COUNT_NAMES)


def clevr_count(rng: np.random.Generator, label: int) -> np.ndarray:
    count = label + 1
    while True:
        img, draw = _canvas()
        placed: list[tuple[float, float, float]] = []
        for _ in range(200):
            if len(placed) == count:
                break
            r = float(rng.uniform(1.8, 3.2))
            cx, cy = float(rng.uniform(r, SIZE - r)), float(rng.uniform(r, SIZE - r))
            if all(math.hypot(cx - x, cy - y) > r + q + 1.5 for x, y, q in placed):
                placed.append((cx, cy, r))
        if len(placed) == count:
            for cx, cy, r in placed:
                _shape(
                    draw,
                    int(rng.integers(0, 3)),
                    cx,
                    cy,
                    r,
                    int(rng.integers(120, 256)),
                    float(rng.uniform(0, 2 * math.pi)),
                )
            return _finish(img)


def generated_task(
    make: Callable[[np.random.Generator, int], np.ndarray], names: list[str], what: str
) -> Callable[[np.random.Generator, int], TaskData]:
    """A structured task: balanced labels, one generated image per draw."""

    def build(rng: np.random.Generator, test_size: int) -> TaskData:
        splits = _generate(make, len(names), rng, test_size)
        return TaskData(
            "structured", names, splits, f"generated ({what})", "generated by this project"
        )

    return build


def scene_task(
    label_of: str, values: tuple[str, ...], names: list[str], fixed: dict[str, str], what: str
) -> Callable[[np.random.Generator, int], TaskData]:
    """A task over ``nas.data.scenes``: the label is the value of one attribute, every other
    attribute random (or ``fixed``)."""
    from dataclasses import replace

    def make(rng: np.random.Generator, label: int) -> np.ndarray:
        counted = 0.3 if label_of == "shape" and not fixed else 0.0
        scene = scenes.random_scene(rng, counted=counted)
        return scenes.render(replace(scene, **{**fixed, label_of: values[label]}), rng)

    def build(rng: np.random.Generator, test_size: int) -> TaskData:
        splits = _generate(make, len(names), rng, test_size)
        _check_not_in_lit(splits)
        return TaskData("scenes", names, splits, f"generated ({what})", "generated by this project")

    return build


@functools.lru_cache(maxsize=1)
def _lit_fingerprints() -> np.ndarray:
    """Fingerprints of the scenes the offline CLIP's text tower was trained with (regenerated:
    they are a deterministic function of trainers.lit's default count and seed)."""

    pairs = scenes.training_pairs(scenes.LIT_SCENES, scenes.LIT_SEED)
    return image_fingerprints(np.stack([image for image, _, _ in pairs]))


def _check_not_in_lit(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """No benchmark image may be one the offline CLIP's text tower was trained with."""
    seen = _lit_fingerprints()
    for split, (images, _) in splits.items():
        shared = np.isin(image_fingerprints(images), seen).sum()
        if shared:
            raise NasError(f"scene task: {shared} {split} images equal CLIP training images")
