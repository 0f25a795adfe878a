"""Procedurally drawn scenes with captions generated from their attributes: the image-caption
pairs that the project's offline CLIP text tower is trained on (locked-image tuning, LiT).

A scene is 28x28 grey (what the committed image tower, vit_fmnist, sees): either one shape with
a size, a fill, a brightness and a position, or several small solid shapes of one kind, counted.
Captions name the attributes from templates, each attribute left out now and then, so that the
text tower learns every word on its own and not only whole phrases.

Some attribute combinations are *held out*: no training scene has them, so zero-shot accuracy
on them measures whether the model composes words it learnt apart (``HELD_OUT``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SIZE = 28
SUPER = 4  # drawn at 4x and box-downsampled: anti-aliased edges

SHAPES = ("circle", "square", "triangle", "cross")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SIZES = ("small", "large")
FILLS = ("solid", "hollow", "striped")
BRIGHTNESS = ("bright", "dim")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
COUNTS = ("two", "three", "four", "five")
TEMPLATES = ("a photo of {}.", "a picture of {}.", "an image of {}.", "{}.")

#: attribute combinations no training scene has (attribute name -> value, per combination)
HELD_OUT: tuple[dict[str, str], ...] = (
    {"shape": "triangle", "fill": "striped"},
    {"shape": "circle", "fill": "hollow"},
    {"shape": "square", "position": "bottom right"},
    {"shape": "cross", "count": "three"},
)

#: the values each attribute takes, as used by zero-shot evaluation
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "size": SIZES,
    "fill": FILLS,
    "brightness": BRIGHTNESS,
    "position": POSITIONS,
    "count": COUNTS,
}


@dataclass(frozen=True)
class Scene:
    """One scene's attributes. ``count`` is None for a single shape; a counted scene has small,
    solid, bright shapes anywhere (its size/fill/brightness/position are None)."""

    shape: str
    count: str | None = None
    size: str | None = None
    fill: str | None = None
    brightness: str | None = None
    position: str | None = None

    def attributes(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def matches(self, combination: dict[str, str]) -> bool:
        return all(getattr(self, k) == v for k, v in combination.items())

    def is_held_out(self) -> bool:
        return any(self.matches(c) for c in HELD_OUT)


# -- drawing -----------------------------------------------------------------------------------


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        r = r / math.sqrt(2) * 1.15
    elif kind == "triangle":
        corners = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    else:  # cross: a plus sign of arm width r/2.5
        w = 0.4
        corners = [
            (-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
            (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w),
        ]  # fmt: skip
    c, s = math.cos(angle), math.sin(angle)
    return [
        ((cx + r * (x * c - y * s)) * SUPER, (cy + r * (x * s + y * c)) * SUPER) for x, y in corners
    ]


def _draw_shape(
    draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, value: int, angle: float
) -> None:
    if kind == "circle":
        box = [(cx - r) * SUPER, (cy - r) * SUPER, (cx + r) * SUPER, (cy + r) * SUPER]
        draw.ellipse(box, fill=value)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, angle), fill=value)


def _mask(kind: str, cx: float, cy: float, r: float, angle: float) -> Image.Image:
    img = Image.new("L", (SIZE * SUPER, SIZE * SUPER), 0)
    _draw_shape(ImageDraw.Draw(img), kind, cx, cy, r, 255, angle)
    return img


def _centre(position: str, r: float, rng: np.random.Generator) -> tuple[float, float]:
    lo, hi = r + 1, SIZE - r - 1
    mid = SIZE / 2
    span = max(0.0, (hi - lo) / 2 - 2)
    if position == "center":
        jitter = min(2.0, span)
        return mid + rng.uniform(-jitter, jitter), mid + rng.uniform(-jitter, jitter)
    vertical, horizontal = position.split()
    x = rng.uniform(lo, lo + span) if horizontal == "left" else rng.uniform(hi - span, hi)
    y = rng.uniform(lo, lo + span) if vertical == "top" else rng.uniform(hi - span, hi)
    return float(x), float(y)


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A 28x28 uint8 image of ``scene`` (random placement, rotation and grey level)."""
    canvas = Image.new("L", (SIZE * SUPER, SIZE * SUPER), 0)
    draw = ImageDraw.Draw(canvas)
    if scene.count is not None:
        n = COUNTS.index(scene.count) + 2
        while True:
            placed: list[tuple[float, float, float]] = []
            for _ in range(300):
                if len(placed) == n:
                    break
                r = float(rng.uniform(2.2, 3.2))
                cx, cy = (
                    float(rng.uniform(r + 0.5, SIZE - r - 0.5)),
                    float(rng.uniform(r + 0.5, SIZE - r - 0.5)),
                )
                if all(math.hypot(cx - x, cy - y) > r + q + 1.5 for x, y, q in placed):
                    placed.append((cx, cy, r))
            if len(placed) == n:
                break
        for cx, cy, r in placed:
            angle = float(rng.uniform(-0.3, 0.3))
            _draw_shape(draw, scene.shape, cx, cy, r, int(rng.integers(190, 256)), angle)
    else:
        r = float(rng.uniform(3.0, 4.5) if scene.size == "small" else rng.uniform(6.5, 8.5))
        cx, cy = _centre(scene.position or "center", r, rng)
        value = int(
            rng.integers(200, 256) if scene.brightness == "bright" else rng.integers(80, 130)
        )
        angle = float(rng.uniform(-0.3, 0.3))
        if scene.fill == "solid":
            _draw_shape(draw, scene.shape, cx, cy, r, value, angle)
        else:
            outer = _mask(scene.shape, cx, cy, r, angle)
            if scene.fill == "hollow":
                inner = _mask(
                    scene.shape, cx, cy, r * (0.55 if scene.size == "large" else 0.4), angle
                )
                region = np.asarray(outer) & ~np.asarray(inner)
            else:  # striped: horizontal bands of 2 px inside the shape
                rows = (np.arange(SIZE * SUPER) // (2 * SUPER)) % 2 == 0
                region = np.asarray(outer) * rows[:, None]
            canvas = Image.fromarray((region > 127).astype(np.uint8) * value)
    return np.asarray(canvas.resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.uint8)


# -- captions ----------------------------------------------------------------------------------


def describe(scene: Scene, rng: np.random.Generator | None = None, drop: float = 0.0) -> str:
    """The scene in words; with ``rng``, each attribute but the shape is left out with
    probability ``drop`` (and the shape itself, as "shape", a little less often)."""

    def keep(attr: str) -> bool:
        return rng is None or rng.random() >= drop

    if scene.count is not None:
        noun = PLURAL[scene.shape] if rng is None or rng.random() >= drop / 2 else "shapes"
        return f"{scene.count} {noun}"
    words = [w for w, a in ((scene.size, "size"), (scene.brightness, "brightness")) if keep(a)]
    if keep("fill"):
        words.append(scene.fill)
    words.append(scene.shape if rng is None or rng.random() >= drop / 2 else "shape")
    text = " ".join(w for w in words if w)
    article = "an" if text[0] in "aeiou" else "a"
    text = f"{article} {text}"
    if scene.position and keep("position"):
        text += " in the center" if scene.position == "center" else f" at the {scene.position}"
    return text


def caption(scene: Scene, rng: np.random.Generator, drop: float = 0.3) -> str:
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    return template.format(describe(scene, rng, drop))


# -- sampling ----------------------------------------------------------------------------------


def random_scene(rng: np.random.Generator, counted: float = 0.3) -> Scene:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    if rng.random() < counted:
        return Scene(shape, count=COUNTS[int(rng.integers(len(COUNTS)))])
    return Scene(
        shape,
        size=SIZES[int(rng.integers(len(SIZES)))],
        fill=FILLS[int(rng.integers(len(FILLS)))],
        brightness=BRIGHTNESS[int(rng.integers(len(BRIGHTNESS)))],
        position=POSITIONS[int(rng.integers(len(POSITIONS)))],
    )


#: How many scenes, from which seed, the shipped offline CLIP's text tower was trained on
#: (``trainers.lit``'s defaults): the benchmark's scene tasks must share none of them.
LIT_SCENES = 60_000
LIT_SEED = 0


def training_pairs(n: int, seed: int) -> Iterator[tuple[np.ndarray, str, Scene]]:
    """``n`` (image, caption, scene) triples, none of a held-out combination."""
    rng = np.random.default_rng(seed)
    made = 0
    while made < n:
        scene = random_scene(rng)
        if scene.is_held_out():
            continue
        yield render(scene, rng), caption(scene, rng), scene
        made += 1


def held_out_scenes(per_combination: int, seed: int) -> list[Scene]:
    """Scenes of every held-out combination, the other attributes random (as allowed)."""
    rng = np.random.default_rng(seed)
    scenes = []
    for combination in HELD_OUT:
        found = 0
        while found < per_combination:
            scene = random_scene(rng, counted=1.0 if "count" in combination else 0.0)
            scene = replace(scene, **combination)
            scenes.append(scene)
            found += 1
    return scenes
