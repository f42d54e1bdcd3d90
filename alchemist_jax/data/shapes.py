"""`shapes`: procedurally generated colour shapes with compositional captions.

Example caption: "a small red circle at the top left on a blue background". Every example is
generated on demand from `(seed, split, index)`, so the source has any size, needs no storage and
is identical on every machine. Labels index `SHAPES`. Ids are `SPLIT_ID_OFFSET[split] + index`, so
the splits never share an id.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from alchemist_jax.config import ShapesConfig
from alchemist_jax.data.sources import Source

SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.14, "large": 0.26}  # half-extent as a fraction of the image side
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
POSITIONS = {  # centre as fractions of (width, height)
    "at the top left": (0.28, 0.28),
    "at the top right": (0.72, 0.28),
    "at the bottom left": (0.28, 0.72),
    "at the bottom right": (0.72, 0.72),
    "in the center": (0.5, 0.5),
}
SPLIT_ID_OFFSET = {"train": 0, "validation": 1_000_000_000, "test": 2_000_000_000}
_SUPERSAMPLE = 4  # anti-aliasing: draw at 4x and average down


def _mask(shape: str, resolution: int, center: tuple[float, float], half: float) -> np.ndarray:
    """float32 (R, R) coverage in [0, 1] of `shape` centred at `center` (pixels) with half-extent
    `half` (pixels)."""
    n = resolution * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / _SUPERSAMPLE
    dx = coords[None, :] - center[0]
    dy = coords[:, None] - center[1]
    if shape == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif shape == "square":
        inside = np.maximum(abs(dx), abs(dy)) <= half * 0.85
    elif shape == "diamond":
        inside = abs(dx) + abs(dy) <= half * 1.15
    else:  # triangle pointing up
        inside = (abs(dy) <= half) & (abs(dx) <= (dy + half) / 2)
    return inside.reshape(resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE).mean(axis=(1, 3))


class ShapesSource(Source):
    """Procedural colour shapes: `size` RGB examples of `resolution`² pixels per split."""

    def __init__(self, split: str = "train", config: ShapesConfig = ShapesConfig()):
        if split not in SPLIT_ID_OFFSET:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLIT_ID_OFFSET)}")
        if config.size < 1 or config.resolution < 8:
            raise ValueError(f"shapes needs size >= 1 and resolution >= 8, got {config}")
        self.name = f"shapes/{split}"
        self.split = split
        self.config = config

    def __len__(self) -> int:
        return self.config.size

    @property
    def ids(self) -> np.ndarray:
        return SPLIT_ID_OFFSET[self.split] + np.arange(self.config.size, dtype=np.int64)

    @property
    def labels(self) -> np.ndarray:
        return np.array([self._attributes(i)[0] for i in range(len(self))], dtype=np.int64)

    def _attributes(self, index: int) -> tuple[int, str, str, str, str, tuple[float, float]]:
        """(shape index, size, colour, position, background, centre jitter) of example `index`."""
        split_number = list(SPLIT_ID_OFFSET).index(self.split)
        rng = np.random.default_rng([self.config.seed, split_number, index])
        shape = int(rng.integers(len(SHAPES)))
        size = str(rng.choice(list(SIZES)))
        color, background = (str(c) for c in rng.choice(list(COLORS), size=2, replace=False))
        position = str(rng.choice(list(POSITIONS)))
        jitter = tuple(float(v) for v in rng.uniform(-0.05, 0.05, size=2))
        return shape, size, color, position, background, jitter

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        shape, size, color, position, background, jitter = self._attributes(index)
        r = self.config.resolution
        center = tuple((c + j) * r for c, j in zip(POSITIONS[position], jitter))
        coverage = _mask(SHAPES[shape], r, center, SIZES[size] * r)[..., None]
        image = coverage * np.array(COLORS[color], np.float32) + (1 - coverage) * np.array(
            COLORS[background], np.float32
        )
        caption = f"a {size} {color} {SHAPES[shape]} {position} on a {background} background"
        return {
            "id": np.int64(SPLIT_ID_OFFSET[self.split] + index),
            "image": np.round(image).astype(np.uint8),
            "caption": caption,
            "label": np.int64(shape),
            "source": "shapes",
        }
