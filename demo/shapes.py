"""Synthetic shape pictures and their questions and answers, for the built-in demo model.

This module needs only Pillow and numpy (no torch), so the test suite can draw held-out
pictures exactly the way the training script drew its training set::

    scene = random_scene(seed)                 # one or two shapes, fully determined by seed
    image = render(scene)                      # a PIL RGB image (sizes vary, some not square)
    answer(scene, "describe")                  # "A red circle and a blue square."

Seeds: ``demo/train.py`` draws its training scenes from ``TRAIN_SEEDS`` and its own held-out
check from ``HELDOUT_SEEDS``; the tests use ``TEST_SEEDS``. The three ranges never overlap.

Conventions the model learns (and the tests check):
* with two shapes, they are named from left to right (their centres are at least
  ``MIN_DX`` of the picture's width apart, so "left" is never ambiguous);
* colour names come from ``COLOURS`` (British spelling in answers, either in questions).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

# Saturated base colours; each drawing jitters them a little so the model learns a range.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (35, 165, 55),
    "blue": (35, 85, 225),
    "purple": (140, 50, 190),
}

INTENTS: tuple[str, ...] = ("describe", "colour", "shape", "count")

# Questions per intent. The first of each list is the canonical one (README, tests).
QUESTIONS: dict[str, tuple[str, ...]] = {
    "describe": (
        "What's in this image?",
        "What is in this image?",
        "What's in the picture?",
        "What do you see?",
        "What is this?",
        "Describe the image.",
        "Describe this picture.",
    ),
    "colour": (
        "What colour is the shape?",
        "What color is the shape?",
        "What colour is it?",
        "What color is it?",
        "Which colour is the shape?",
        "What colours are the shapes?",
        "What colors are the shapes?",
    ),
    "shape": (
        "What shape is it?",
        "What shape is this?",
        "Which shape is it?",
        "What kind of shape is it?",
        "What shapes are there?",
    ),
    "count": (
        "How many shapes are there?",
        "How many shapes are in the image?",
        "How many shapes do you see?",
        "How many objects are there?",
    ),
}

TRAIN_SEEDS = range(0, 100_000_000)
HELDOUT_SEEDS = range(900_000_000, 1_000_000_000)
TEST_SEEDS = range(2_000_000_000, 2_100_000_000)

MIN_DX = 0.22  # two shapes' centres differ by at least this fraction of the width
SIZE_ONE = (0.40, 0.70)  # shape size (bounding circle diameter) / shorter side
SIZE_TWO = (0.32, 0.46)


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    rgb: tuple[int, int, int]
    cx: float  # centre, pixels
    cy: float
    size: float  # diameter of the bounding circle, pixels
    angle: float  # degrees


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: tuple[str, tuple[int, int, int], tuple[int, int, int], float, float]
    """(style, colour a, colour b, gradient angle in radians, noise amplitude)."""
    shapes: tuple[Shape, ...]  # left to right
    noise_seed: int


def random_scene(seed: int, n_shapes: int | None = None) -> Scene:
    """A random scene, fully determined by ``seed`` (and ``n_shapes`` when given)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3)) if n_shapes is None else n_shapes
    if n not in (1, 2):
        raise ValueError("a scene has one or two shapes")
    # picture size: mostly square-ish, a third noticeably landscape or portrait
    side = int(rng.integers(80, 225))
    if rng.random() < 0.35:
        ratio = float(rng.uniform(1.1, 1.3))
        long_side = int(side * ratio)
        w, h = (long_side, side) if rng.random() < 0.5 else (side, long_side)
    else:
        w = h = side
    background = _random_background(rng)
    shapes = _place(rng, n, w, h)
    return Scene(w, h, background, shapes, int(rng.integers(0, 2**31)))


def _muted(rng: np.random.Generator) -> tuple[int, int, int]:
    """A low-saturation colour (grey-ish) at any brightness, so every shape colour shows."""
    level = float(rng.uniform(25, 235))
    tint = rng.normal(0, 1, 3)
    tint = tint / (np.linalg.norm(tint) + 1e-9) * float(rng.uniform(0, 22))
    return tuple(int(v) for v in np.clip(level + tint, 0, 255))  # type: ignore[return-value]


def _random_background(
    rng: np.random.Generator,
) -> tuple[str, tuple[int, int, int], tuple[int, int, int], float, float]:
    style = str(rng.choice(["solid", "gradient", "noise"], p=[0.4, 0.35, 0.25]))
    a = _muted(rng)
    b = _muted(rng)
    angle = float(rng.uniform(0, 2 * math.pi))
    noise = float(rng.uniform(6, 18)) if style == "noise" else 0.0
    return style, a, b, angle, noise


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    scale = float(rng.uniform(0.85, 1.1))
    out = np.asarray(rgb, dtype=np.float64) * scale + rng.normal(0, 8, 3)
    return tuple(int(v) for v in np.clip(out, 0, 255))  # type: ignore[return-value]


def _place(rng: np.random.Generator, n: int, w: int, h: int) -> tuple[Shape, ...]:
    short = min(w, h)
    lo, hi = SIZE_ONE if n == 1 else SIZE_TWO
    for _ in range(1000):
        shapes = []
        for _i in range(n):
            kind = str(rng.choice(SHAPES))
            colour = str(rng.choice(list(COLOURS)))
            size = float(rng.uniform(lo, hi)) * short
            r = size / 2
            cx = float(rng.uniform(r + 2, w - r - 2))
            cy = float(rng.uniform(r + 2, h - r - 2))
            if kind == "star":
                angle = float(rng.uniform(0, 72))
            elif kind == "circle":
                angle = 0.0
            else:
                angle = float(rng.uniform(-15, 15))
            shapes.append(Shape(kind, colour, _jitter(rng, COLOURS[colour]), cx, cy, size, angle))
        if n == 2:
            s1, s2 = shapes
            if (s1.kind, s1.colour) == (s2.kind, s2.colour):
                continue  # two identical shapes would need a plural answer
            if abs(s1.cx - s2.cx) < MIN_DX * w:
                continue
            if math.hypot(s1.cx - s2.cx, s1.cy - s2.cy) < (s1.size + s2.size) / 2 + 3:
                continue
        return tuple(sorted(shapes, key=lambda s: s.cx))
    raise RuntimeError("could not place the shapes")  # pragma: no cover


def _polygon(
    kind: str, cx: float, cy: float, size: float, angle: float
) -> list[tuple[float, float]]:
    r = size / 2
    rot = math.radians(angle)
    if kind == "square":
        pts = [
            (r * math.cos(a), r * math.sin(a))
            for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))
        ]
    elif kind == "triangle":
        # equilateral, pointing up, centred on the bounding circle's centre
        pts = [
            (r * math.cos(a), r * math.sin(a))
            for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))
        ]
    elif kind == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else r * 0.42
            pts.append((rr * math.cos(a), rr * math.sin(a)))
    else:
        raise ValueError(kind)
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


SUPERSAMPLE = 2


def scaled(scene: Scene, factor: float) -> Scene:
    """The same scene drawn ``factor`` times as large (pictures are compared after resizing)."""
    shapes = tuple(
        Shape(s.kind, s.colour, s.rgb, s.cx * factor, s.cy * factor, s.size * factor, s.angle)
        for s in scene.shapes
    )
    w, h = max(1, round(scene.width * factor)), max(1, round(scene.height * factor))
    return Scene(w, h, scene.background, shapes, scene.noise_seed)


def render(scene: Scene) -> Image.Image:
    """Draw the scene (anti-aliased by drawing at twice the size and downscaling)."""
    w, h = scene.width, scene.height
    style, a, b, angle, noise = scene.background
    if style == "gradient":
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
        t = (xs / max(w - 1, 1) - 0.5) * math.cos(angle) + (ys / max(h - 1, 1) - 0.5) * math.sin(
            angle
        )
        t = np.clip(t + 0.5, 0, 1)[..., None]
        bg = np.asarray(a, dtype=np.float64) * (1 - t) + np.asarray(b, dtype=np.float64) * t
    else:
        bg = np.broadcast_to(np.asarray(a, dtype=np.float64), (h, w, 3)).copy()
    if noise > 0:
        nrng = np.random.default_rng(scene.noise_seed)
        bg = bg + nrng.normal(0, noise, (h, w, 1))
    base = Image.fromarray(np.clip(bg, 0, 255).round().astype(np.uint8), "RGB")

    k = SUPERSAMPLE
    layer = Image.new("RGBA", (w * k, h * k), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for s in scene.shapes:
        fill = (*s.rgb, 255)
        if s.kind == "circle":
            r = s.size / 2 * k
            draw.ellipse([s.cx * k - r, s.cy * k - r, s.cx * k + r, s.cy * k + r], fill=fill)
        else:
            draw.polygon(_polygon(s.kind, s.cx * k, s.cy * k, s.size * k, s.angle), fill=fill)
    layer = layer.resize((w, h), Image.LANCZOS)
    base.paste(layer, (0, 0), layer)
    return base


# --- questions and answers -----------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(words: list[str]) -> str:
    return " and ".join(words)


def answer(scene: Scene, intent: str) -> str:
    """The answer the model is trained to give (shapes named left to right)."""
    shapes = scene.shapes
    if intent == "describe":
        text = _join([f"{_article(s.colour)} {s.colour} {s.kind}" for s in shapes])
    elif intent == "colour":
        text = _join([s.colour for s in shapes])
    elif intent == "shape":
        text = _join([f"a {s.kind}" for s in shapes])
    elif intent == "count":
        text = "there is one shape" if len(shapes) == 1 else "there are two shapes"
    else:
        raise ValueError(intent)
    return text[0].upper() + text[1:] + "."


_WORD = re.compile(r"[a-z]+")
_COUNTS = {"one": 1, "two": 2, "three": 3, "four": 4}


def parse_objects(text: str) -> list[tuple[str | None, str | None]]:
    """(colour, shape) pairs named in an answer, in order (None where a part is missing).

    ``"A red circle and a blue square."`` -> ``[("red", "circle"), ("blue", "square")]``.
    """
    out: list[tuple[str | None, str | None]] = []
    colour: str | None = None
    for word in _WORD.findall(text.lower().replace("color", "colour")):
        if word in COLOURS:
            if colour is not None:
                out.append((colour, None))
            colour = word
        elif word in SHAPES or (word.endswith("s") and word[:-1] in SHAPES):
            out.append((colour, word.rstrip("s") if word not in SHAPES else word))
            colour = None
    if colour is not None:
        out.append((colour, None))
    return out


def parse_count(text: str) -> int | None:
    """The number an answer to the count question names (``None`` if none or several)."""
    found = {_COUNTS[w] for w in _WORD.findall(text.lower()) if w in _COUNTS}
    found |= {int(d) for d in re.findall(r"\d+", text)}
    return found.pop() if len(found) == 1 else None


def objects(scene: Scene) -> list[tuple[str, str]]:
    return [(s.colour, s.kind) for s in scene.shapes]


# --- LLaVA preprocessing (what mmchat's vision engine does for LLaVA models) ----------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def pad_colour(mean: tuple[float, float, float] = CLIP_MEAN) -> tuple[int, int, int]:
    return (int(255 * mean[0]), int(255 * mean[1]), int(255 * mean[2]))


def llava_pixels(
    image: Image.Image,
    size: int,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> np.ndarray:
    """Original LLaVA's 'pad' preprocessing: square with the mean colour, bicubic resize,
    normalise. Returns float32 [3, size, size]."""
    img = image.convert("RGB")
    w, h = img.size
    if w != h:
        side = max(w, h)
        sq = Image.new("RGB", (side, side), pad_colour(mean))
        sq.paste(img, ((side - w) // 2, (side - h) // 2))
        img = sq
    img = img.resize((size, size), Image.BICUBIC)
    a = np.asarray(img, dtype=np.float64) / 255.0
    a = (a - np.asarray(mean)) / np.asarray(std)
    return np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32)


# --- the sample pictures in examples/ ------------------------------------------------------


def example_scenes() -> dict[str, Scene]:
    """The README's sample pictures (``python demo/shapes.py`` writes them to examples/)."""
    light = ("gradient", (228, 226, 220), (200, 204, 210), 0.6, 0.0)
    dark = ("solid", (52, 54, 60), (52, 54, 60), 0.0, 0.0)
    return {
        "red-circle.png": Scene(
            256, 256, light, (Shape("circle", "red", COLOURS["red"], 128, 128, 120, 0),), 1
        ),
        "blue-square-yellow-star.png": Scene(
            320,
            240,
            dark,
            (
                Shape("square", "blue", COLOURS["blue"], 95, 110, 100, 8),
                Shape("star", "yellow", COLOURS["yellow"], 230, 135, 110, 10),
            ),
            2,
        ),
        "green-triangle.png": Scene(
            240,
            240,
            ("noise", (150, 150, 146), (150, 150, 146), 0.0, 10.0),
            (Shape("triangle", "green", COLOURS["green"], 110, 130, 130, 0),),
            3,
        ),
    }


def main() -> None:
    from pathlib import Path

    out = Path(__file__).resolve().parent.parent / "examples"
    out.mkdir(exist_ok=True)
    for name, scene in example_scenes().items():
        render(scene).save(out / name, format="PNG", optimize=True)
        print(f"{out / name}: {answer(scene, 'describe')}")


if __name__ == "__main__":
    main()
