"""The synthetic drift benchmark: procedurally drawn image-caption pairs whose concepts change by year."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from trainer.layout import EVAL, SPLITS, TRAIN
from trainer.prep.images import ENCODERS
from trainer.prep.records import Sample, make_sample

# List orders interleave dissimilar concepts so each year's sliding window mixes looks.
SHAPES = (
    "circle",
    "triangle",
    "square",
    "star",
    "cross",
    "crescent",
    "diamond",
    "ring",
    "hexagon",
    "arrow",
    "hourglass",
    "pentagon",
)
COLOURS = {
    "red": (230, 40, 40),
    "cyan": (40, 220, 230),
    "yellow": (240, 230, 40),
    "purple": (150, 70, 235),
    "green": (40, 185, 70),
    "magenta": (235, 50, 200),
    "orange": (245, 140, 30),
    "blue": (50, 90, 245),
    "white": (245, 245, 245),
    "pink": (250, 165, 195),
}
BACKGROUNDS = ("plain", "striped", "checkered", "dotted", "gradient", "noisy", "grid", "wavy")
POSITIONS = {
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "center": (0.5, 0.5),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
}
SIZE_RANGE = (0.14, 0.24)
# One phrasing per year: within a year the caption is a function of what the image shows, so
# caption-matching retrieval has no ceiling below 100%; across years the wording drifts.
CAPTIONS = (
    "a {colour} {shape} at {position} on {background}",
    "{colour} {shape}, {position}, {background} backdrop",
    "{colour} {shape} photo, {position}, {background}",
    "{background} scene: {colour} {shape} at {position}",
)
TEMPLATES = ("a photo of a {}.", "a {}.", "a drawing of a {}.", "a {} on a background.")

ACTIVE_SHAPES, NEW_SHAPES = 4, 2
ACTIVE_COLOURS, NEW_COLOURS = 4, 2
ACTIVE_BACKGROUNDS = 3
SUPERSAMPLE = 2
NOISE_STD = 6.0


@dataclass(frozen=True)
class YearConcepts:
    """What one year of the benchmark shows and says."""

    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    backgrounds: tuple[str, ...]
    caption: str


def year_concepts(index: int) -> YearConcepts:
    """The concepts active in the `index`-th year of the benchmark (0 = first year)."""

    def window(items: tuple[str, ...], start: int, count: int) -> tuple[str, ...]:
        return tuple(items[(start + j) % len(items)] for j in range(count))

    return YearConcepts(
        shapes=window(SHAPES, NEW_SHAPES * index, ACTIVE_SHAPES),
        colours=window(tuple(COLOURS), NEW_COLOURS * index, ACTIVE_COLOURS),
        backgrounds=window(BACKGROUNDS, index, ACTIVE_BACKGROUNDS),
        caption=CAPTIONS[index % len(CAPTIONS)],
    )


def class_names(n_years: int) -> list[str]:
    """Names of every (colour, shape) class of an `n_years` benchmark, in class-index order (first seen)."""
    names: list[str] = []
    for index in range(n_years):
        concepts = year_concepts(index)
        for shape in concepts.shapes:
            names.extend(f"{c} {shape}" for c in concepts.colours if f"{c} {shape}" not in names)
    return names


def classes_by_year(years: list[int]) -> dict[str, list[int]]:
    """Class indices active in each year, so zero-shot evaluation can be restricted to that year."""
    lookup = {name: i for i, name in enumerate(class_names(len(years)))}
    result = {}
    for index, year in enumerate(years):
        concepts = year_concepts(index)
        result[str(year)] = sorted(lookup[f"{c} {s}"] for s in concepts.shapes for c in concepts.colours)
    return result


def _rotate(points: list[tuple[float, float]], cx: float, cy: float, turn: float) -> list[tuple[float, float]]:
    c, s = math.cos(turn), math.sin(turn)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _outline(shape: str, r: float) -> list[tuple[float, float]]:
    """Polygon of a shape centred on the origin with radius `r` (shapes drawn as polygons only)."""
    w = 0.38 * r
    regular = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}
    if shape in regular:
        sides = regular[shape]
        radius = r * (1.2 if shape == "square" else 1.1)
        base = -math.pi / 2 + (math.pi / 4 if shape == "square" else 0.0)
        return [
            (radius * math.cos(base + 2 * math.pi * k / sides), radius * math.sin(base + 2 * math.pi * k / sides))
            for k in range(sides)
        ]
    if shape == "diamond":
        return [(0, -1.2 * r), (0.7 * r, 0), (0, 1.2 * r), (-0.7 * r, 0)]
    if shape == "star":
        return [
            (
                (r * 1.2 if k % 2 == 0 else r * 0.5) * math.cos(-math.pi / 2 + math.pi * k / 5),
                (r * 1.2 if k % 2 == 0 else r * 0.5) * math.sin(-math.pi / 2 + math.pi * k / 5),
            )
            for k in range(10)
        ]
    if shape == "cross":
        return [
            (-w, -r),
            (w, -r),
            (w, -w),
            (r, -w),
            (r, w),
            (w, w),
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
        ]
    if shape == "arrow":
        return [(-r, -w), (0, -w), (0, -r), (r, 0), (0, r), (0, w), (-r, w)]
    if shape == "hourglass":
        return [(-r, -r), (r, -r), (-r, r), (r, r)]
    raise ValueError(f"unknown shape {shape!r}")


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, turn: float) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "ring":
        draw.ellipse(box, outline=255, width=max(1, round(0.4 * r)))
    elif shape == "crescent":
        draw.ellipse(box, fill=255)
        dx, dy = 0.55 * r * math.cos(turn), 0.55 * r * math.sin(turn)
        draw.ellipse((cx + dx - 0.9 * r, cy + dy - 0.9 * r, cx + dx + 0.9 * r, cy + dy + 0.9 * r), fill=0)
    else:
        # Polygons only get a small tilt: a full turn would make square and diamond the same class.
        draw.polygon(_rotate(_outline(shape, r), cx, cy, 0.25 * math.sin(turn)), fill=255)
    return mask


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A dark, low-saturation texture so every shape colour stays visible on it."""
    low, high = rng.uniform(25, 55), rng.uniform(80, 120)
    tint = rng.uniform(0.85, 1.15, size=3)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    period = rng.uniform(0.12, 0.2)
    phase = rng.uniform(0, 1)
    if kind == "plain":
        field = np.full((size, size), 0.5)
    elif kind == "striped":
        field = ((x + phase) / period % 1.0 < 0.5).astype(float)
    elif kind == "checkered":
        field = (((x + phase) / period).astype(int) + ((y + phase) / period).astype(int)) % 2.0
    elif kind == "dotted":
        field = (np.hypot((x + phase) / period % 1.0 - 0.5, (y + phase) / period % 1.0 - 0.5) < 0.22).astype(float)
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        field = (x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle) + 0.5
    elif kind == "noisy":
        field = rng.random((size // SUPERSAMPLE, size // SUPERSAMPLE)).repeat(SUPERSAMPLE, 0).repeat(SUPERSAMPLE, 1)
    elif kind == "grid":
        field = (((x + phase) / period % 1.0 < 0.18) | ((y + phase) / period % 1.0 < 0.18)).astype(float)
    elif kind == "wavy":
        field = (np.sin(2 * math.pi * ((y + phase) / period + 0.35 * np.sin(2 * math.pi * x * 2))) > 0).astype(float)
    else:
        raise ValueError(f"unknown background {kind!r}")
    gray = low + (high - low) * np.clip(field, 0.0, 1.0)
    return np.clip(gray[..., None] * tint, 0, 255)


def draw_sample(year_index: int, rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, str, str]:
    """Draw one sample of a year: (HxWx3 uint8 image, caption, class name)."""
    concepts = year_concepts(year_index)
    shape = concepts.shapes[rng.integers(len(concepts.shapes))]
    colour = concepts.colours[rng.integers(len(concepts.colours))]
    background = concepts.backgrounds[rng.integers(len(concepts.backgrounds))]
    position = tuple(POSITIONS)[rng.integers(len(POSITIONS))]

    big = image_size * SUPERSAMPLE
    fx, fy = POSITIONS[position]
    cx, cy = (fx + rng.uniform(-0.06, 0.06)) * big, (fy + rng.uniform(-0.06, 0.06)) * big
    radius = rng.uniform(*SIZE_RANGE) * big
    mask = _shape_mask(shape, big, cx, cy, radius, rng.uniform(0, 2 * math.pi))

    canvas = _background(background, big, rng)
    colour_rgb = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 12, size=3), 0, 255)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    canvas = canvas * (1 - alpha) + colour_rgb * alpha
    small = Image.fromarray(canvas.astype(np.uint8)).resize((image_size, image_size), Image.Resampling.BOX)
    pixels = np.asarray(small, dtype=np.float64) + rng.normal(0, NOISE_STD, size=(image_size, image_size, 3))
    caption = concepts.caption.format(colour=colour, shape=shape, position=position, background=background)
    return np.clip(pixels, 0, 255).astype(np.uint8), caption, f"{colour} {shape}"


def encode(pixels: np.ndarray, image_format: str) -> tuple[bytes, str]:
    """Encode an image for the shard; synthetic images default to lossless PNG."""
    ext = "png" if image_format == "keep" else image_format
    pil_format, params = ENCODERS[ext]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=pil_format, **params)
    return buffer.getvalue(), ext


@dataclass(frozen=True)
class SyntheticUnit:
    """A chunk of one year's train or eval samples; every sample has its own RNG stream, so chunks are independent."""

    years: tuple[int, ...]
    year_index: int
    split: str
    start: int
    stop: int
    seed: int
    image_size: int
    image_format: str

    def items(self) -> Iterator[Sample]:
        """Draw samples start..stop-1 of this unit's year and split."""
        year = self.years[self.year_index]
        lookup = {name: i for i, name in enumerate(class_names(len(self.years)))}
        for index in range(self.start, self.stop):
            rng = np.random.default_rng([self.seed, year, SPLITS.index(self.split), index])
            pixels, caption, name = draw_sample(self.year_index, rng, self.image_size)
            image, ext = encode(pixels, self.image_format)
            uid = f"syn-{year}-{self.split}-{index:07d}"
            yield make_sample(
                uid, year, self.split, image, ext, caption, {"caption": caption, "class": name}, cls=lookup[name]
            )


def synthetic_units(
    years: list[int],
    samples_per_year: int,
    eval_samples: int,
    seed: int,
    image_size: int,
    image_format: str,
    chunk: int = 1000,
) -> list[SyntheticUnit]:
    """Split the whole benchmark into units of at most `chunk` samples, train before eval, year by year."""
    units = []
    for year_index in range(len(years)):
        for split, count in ((TRAIN, samples_per_year), (EVAL, eval_samples)):
            for start in range(0, count, chunk):
                units.append(
                    SyntheticUnit(
                        tuple(years),
                        year_index,
                        split,
                        start,
                        min(start + chunk, count),
                        seed,
                        image_size,
                        image_format,
                    )
                )
    return units
