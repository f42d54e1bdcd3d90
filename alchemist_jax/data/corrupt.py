"""Defect injection for benchmarks: a copy of a source with a known fraction of damaged examples.

    noisy, truth = corrupt(source, 0.3, seed=0, truth_path="runs/x/defects.parquet")

`round(fraction * N)` indices are drawn with `numpy.random.default_rng(seed)` and dealt in turn
among the defect `kinds` (so the counts per kind differ by at most one):

  - `noise`: strong gaussian noise (std 100 on the 0..255 scale), clipped to uint8.
  - `blur`: gaussian blur of radius max(1.5, H / 14) (2 for 28 px images).
  - `blank`: one constant gray level, drawn per example.
  - `caption_swap`: the caption of another example with a different label (without labels:
    another example whose caption text differs). The image and label are kept, so the label
    stays the true class of the image and the caption is the wrong one.
  - `duplicate`: the image, caption and label of another, clean example; the id stays its own.
  - `lowres`: downsampled 4x (bilinear), then upsampled back to H x W (nearest): blocky pixels.

The truth is a pyarrow table with one row per index of the source, in order: `id` int64,
`defect` string (null when clean) and `source_id` int64 (the id whose caption, or image and
caption, was copied; null unless `caption_swap` / `duplicate`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFilter

from alchemist_jax.config import DEFECT_KINDS
from alchemist_jax.data.cache import atomic_write_parquet
from alchemist_jax.data.sources import Source

NOISE_STD = 100.0  # on the 0..255 scale
LOWRES_FACTOR = 4
COPYING_KINDS = ("caption_swap", "duplicate")  # the defects with a `source_id`


def corrupt(
    source: Source,
    fraction: float,
    kinds: Sequence[str] = DEFECT_KINDS,
    seed: int = 0,
    truth_path: str | Path | None = None,
) -> tuple["CorruptedSource", pa.Table]:
    """Damages `round(fraction * len(source))` examples of `source`, lazily.

    Args:
      source: examples with `image` uint8 (H, W, C) and `caption`; precomputed `latent` /
        `text_embedding` fields are refused, since they would not match the damaged example.
      fraction: in [0, 1].
      kinds: the defects to inject, a non-empty subset of `DEFECT_KINDS`.
      seed: picks the examples, their defects, copy sources, noise and gray levels.
      truth_path: where to also write the truth table as Parquet (atomically), or None.
    Returns:
      (the corrupted source, the truth table described in the module docstring).
    Raises:
      ValueError: an unknown or repeated kind, no kinds, a fraction outside [0, 1], a source
        without images or captions, or no example to copy from.
    """
    kinds = tuple(kinds)
    unknown = [kind for kind in kinds if kind not in DEFECT_KINDS]
    if unknown:
        raise ValueError(f"unknown defect kind {', '.join(map(repr, unknown))}; "
                         f"valid kinds: {', '.join(DEFECT_KINDS)}")
    if not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(f"defect kinds must be one or more distinct kinds, got {kinds}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"corrupt fraction must be in [0, 1], got {fraction}")
    _check_pixels_and_captions(source)

    rng = np.random.default_rng(seed)
    size = len(source)
    defects = np.full(size, None, dtype=object)
    picked = rng.choice(size, size=round(fraction * size), replace=False)  # in random order
    defects[picked] = [kinds[turn % len(kinds)] for turn in range(len(picked))]
    donors = np.full(size, -1, dtype=np.int64)
    duplicates = np.flatnonzero(defects == "duplicate")
    if len(duplicates):
        clean = np.flatnonzero(defects == None)  # noqa: E711 (elementwise on an object array)
        if not len(clean):
            raise ValueError("`duplicate` needs clean examples to copy; lower the corrupt fraction")
        donors[duplicates] = rng.choice(clean, size=len(duplicates))
    labels = source.labels
    for index in np.flatnonzero(defects == "caption_swap"):
        donors[index] = _caption_donor(source, labels, index, rng)

    corrupted = CorruptedSource(source, defects, donors, seed)
    truth = corrupted.truth()
    if truth_path is not None:
        atomic_write_parquet(Path(truth_path), truth)
    return corrupted, truth


class CorruptedSource(Source):
    """`base` with defects applied on the fly in `__getitem__` (deterministic per index).

    Same length and ids as `base`. Labels are the true class of each image: the base label,
    except for a `duplicate`, which takes the label of the example it copies. Clean examples are
    returned exactly as `base` returns them.

    Args:
      base: the clean source.
      defects: object (N,): the defect kind of each index, or None when clean.
      donors: int64 (N,): for `caption_swap` / `duplicate`, the index copied from; else -1.
      seed: seeds the per-example noise and gray levels, with the index.
    """

    def __init__(self, base: Source, defects: np.ndarray, donors: np.ndarray, seed: int):
        self.base = base
        self.name = f"{base.name}+corrupt"
        self.defects = defects
        self.donors = donors
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        example = self.base[index]
        defect = self.defects[index]
        if defect is None:
            return example
        example = dict(example)
        if defect in COPYING_KINDS:
            donor = self.base[int(self.donors[index])]
            example["caption"] = donor["caption"]
            if defect == "duplicate":
                example["image"] = donor["image"]
                if "label" in donor:
                    example["label"] = donor["label"]
        else:
            rng = np.random.default_rng((self.seed, index))
            example["image"] = IMAGE_DEFECTS[defect](np.asarray(example["image"]), rng)
        return example

    @property
    def ids(self) -> np.ndarray:
        return self.base.ids

    @property
    def labels(self) -> np.ndarray | None:
        labels = self.base.labels
        if labels is None:
            return None
        duplicates = self.defects == "duplicate"
        labels = labels.copy()
        labels[duplicates] = labels[self.donors[duplicates]]
        return labels

    def truth(self) -> pa.Table:
        """Columns `id` int64, `defect` string, `source_id` int64; one row per index, in order."""
        ids = self.ids
        source_ids = [int(ids[donor]) if donor >= 0 else None for donor in self.donors]
        return pa.table({
            "id": pa.array(ids, pa.int64()),
            "defect": pa.array(list(self.defects), pa.string()),
            "source_id": pa.array(source_ids, pa.int64()),
        })


# ----------------------------------------------------------------------------------------------
# Image defects: uint8 (H, W, C) -> uint8 (H, W, C), drawing from `rng` where random.
# ----------------------------------------------------------------------------------------------


def add_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = image.astype(np.float32) + rng.normal(0.0, NOISE_STD, image.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    radius = max(1.5, image.shape[0] / 14)
    return _per_channel(image, lambda channel: channel.filter(ImageFilter.GaussianBlur(radius)))


def blank(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.full_like(image, rng.integers(0, 256))


def lower_resolution(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    height, width = image.shape[:2]
    small = (max(1, width // LOWRES_FACTOR), max(1, height // LOWRES_FACTOR))
    return _per_channel(image, lambda channel: channel.resize(small, Image.Resampling.BILINEAR)
                        .resize((width, height), Image.Resampling.NEAREST))


IMAGE_DEFECTS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "noise": add_noise, "blur": blur, "blank": blank, "lowres": lower_resolution,
}


def _per_channel(image: np.ndarray, edit: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    """Applies a PIL edit to each channel of uint8 (H, W, C) as a grayscale image."""
    channels = [np.asarray(edit(Image.fromarray(np.ascontiguousarray(image[..., c]))))
                for c in range(image.shape[-1])]
    return np.stack(channels, axis=-1)


# ----------------------------------------------------------------------------------------------
# Checks and copy sources
# ----------------------------------------------------------------------------------------------


def _check_pixels_and_captions(source: Source) -> None:
    """Refuses sources whose examples lack pixels or captions, or carry precomputed inputs."""
    if not len(source):
        return
    fields = source[0].keys()
    if not {"image", "caption"} <= fields or {"latent", "text_embedding"} & fields:
        raise ValueError(f"corrupt needs examples with `image` and `caption` and no precomputed "
                         f"`latent` / `text_embedding`; {source!r} has {', '.join(fields)}")


def _caption_donor(source: Source, labels: np.ndarray | None, index: int,
                   rng: np.random.Generator) -> int:
    """A random other index whose caption text differs, with a different label if labeled."""
    if labels is None:
        others = np.delete(np.arange(len(source)), index)
    else:
        others = np.flatnonzero(labels != labels[index])
    caption = source[index]["caption"]
    for other in rng.permutation(others):
        if source[int(other)]["caption"] != caption:
            return int(other)
    raise ValueError(f"`caption_swap` found no example with a different caption"
                     f"{' and label' if labels is not None else ''} for index {index}")
