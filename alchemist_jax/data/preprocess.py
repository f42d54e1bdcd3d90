"""From an example to model inputs: resize / center-crop, scale to [-1, 1], tokenize.

`Preprocessor` is the per-example transform the grain pipelines map over a source. Its output is a
dict of numpy arrays only (strings stay behind), ready to be stacked into a batch:
  - `id`: int64 ()
  - `image`: float32 (R, R, C) in [-1, 1], when the example has pixels
  - `tokens`: int32 (L,) CLIP ids padded with 49407; `token_mask`: bool (L,), when it has a caption
  - `label`: int64 (), when the source has labels
  - `latent`, `text_embedding`: float32, passed through unchanged (precomputed inputs); with a
    `text_embedding` the caption is not tokenized and its `token_mask` (bool (L,), when the
    example has one: `alchemist-jax encode` stores it) passes through instead
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from alchemist_jax.config import DataConfig
from alchemist_jax.data.sources import (
    FINGERPRINT_SAMPLE,
    ArraySource,
    Source,
    Subset,
    fingerprint_rows,
)
from alchemist_jax.data.tokenizer import Tokenizer
from alchemist_jax.runtime import progress


def resize_center_crop(image: np.ndarray, resolution: int, channels: int) -> np.ndarray:
    """Resizes the shorter side to `resolution` and crops the centre square.

    Args:
      image: uint8 (H, W, C) with C in {1, 3}.
      resolution: output side R.
      channels: output C (1: luminance, 3: RGB; gray input is repeated).
    Returns:
      uint8 (R, R, channels).
    """
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    pil = pil.convert("L" if channels == 1 else "RGB")
    width, height = pil.size
    if (width, height) != (resolution, resolution):
        scale = resolution / min(width, height)
        new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        pil = pil.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        left = (new_size[0] - resolution) // 2
        top = (new_size[1] - resolution) // 2
        pil = pil.crop((left, top, left + resolution, top + resolution))
    out = np.asarray(pil, dtype=np.uint8)
    return out[..., None] if channels == 1 else out


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1] (0 -> -1, 255 -> 1)."""
    return image.astype(np.float32) / 127.5 - 1.0


class Preprocessor:
    """Example -> model inputs (see the module docstring for the output fields).

    Args:
      resolution: images become (resolution, resolution, channels).
      channels: 1 or 3.
      max_text_length: CLIP context length L (77 for real data; shorter is fine for the pool).
    """

    def __init__(self, resolution: int, channels: int, max_text_length: int):
        self.resolution = resolution
        self.channels = channels
        self.tokenizer = Tokenizer(max_text_length)

    @classmethod
    def for_config(cls, config: DataConfig) -> Preprocessor:
        """The preprocessing a run's `data` section asks for (resolution, channels,
        max_text_length): every command of a run uses this one."""
        return cls(config.resolution, config.channels, config.max_text_length)

    def __call__(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
        out = {"id": np.int64(example["id"])}
        if "image" in example:
            pixels = resize_center_crop(
                np.asarray(example["image"]), self.resolution, self.channels
            )
            out["image"] = to_unit_range(pixels)
        if "caption" in example and "text_embedding" not in example:
            tokens, mask = self.tokenizer([example["caption"]])
            out["tokens"], out["token_mask"] = tokens[0], mask[0]
        if "label" in example:
            out["label"] = np.int64(example["label"])
        for key in ("latent", "text_embedding"):
            if key in example:
                out[key] = np.asarray(example[key], np.float32)
        if "text_embedding" in example and "token_mask" in example:
            out["token_mask"] = np.asarray(example["token_mask"], np.bool_)
        return out


def preprocess_rows(
    source: Source, indices: Sequence[int], preprocessor: Preprocessor
) -> dict[str, np.ndarray]:
    """The examples of `source` at `indices`, preprocessed and stacked: each field of
    `preprocessor(example)` as an array with a leading axis len(indices). The captions are
    tokenized together (4x faster than one by one)."""
    examples = [source[i] for i in indices]
    captions = [example.pop("caption") for example in examples if "caption" in example]
    rows = [preprocessor(example) for example in examples]
    if captions and "text_embedding" not in examples[0]:
        if len(captions) != len(examples):
            raise ValueError(f"{source.name}: some examples have no caption")
        tokens, mask = preprocessor.tokenizer(captions)
        for row, row_tokens, row_mask in zip(rows, tokens, mask):
            row["tokens"], row["token_mask"] = row_tokens, row_mask
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def materialize(source: Source, preprocessor: Preprocessor, chunk: int = 4096) -> ArraySource:
    """Preprocesses every example of `source` once, into memory.

    For pools that fit in host memory (the built-in pool: 8,000 examples, 25 MB) this takes the
    image decoding and tokenization out of the training loop; batches are then gathered from
    arrays. Captions are tokenized in chunks (4x faster than one by one).

    Returns:
      An ArraySource with the same ids and labels whose examples hold the fields of
      `preprocessor(example)` (`image` float32 (R, R, C), `tokens`, `token_mask`, ...).
    """
    fields: dict[str, list[np.ndarray]] = {}
    for start in progress.bar(
        range(0, len(source), chunk), desc=f"preprocessing {source.name}", unit="chunk", leave=False
    ):
        rows = preprocess_rows(source, range(start, min(start + chunk, len(source))), preprocessor)
        for key, column in rows.items():
            fields.setdefault(key, []).append(column)
    arrays = {key: np.concatenate(parts) for key, parts in fields.items()}
    ids, labels = arrays.pop("id"), arrays.pop("label", None)
    return ArraySource(f"{source.name}+preprocessed", ids, None, None, labels, extra=arrays)


class StreamedSource(Source):
    """`base` preprocessed on every read: `streamed[i] = preprocessor(base[i])`, nothing held in
    memory but the ids (and labels); what `prepared` returns for a split larger than
    `data.in_memory_limit`. Same ids, labels and example fields as `materialize(base, ...)`."""

    def __init__(self, base: Source, preprocessor: Preprocessor):
        self.base, self.preprocessor = base, preprocessor
        self.name = f"{base.name}+preprocessed"

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.preprocessor(self.base[index])

    @property
    def ids(self) -> np.ndarray:
        return self.base.ids

    @property
    def labels(self) -> np.ndarray | None:
        return self.base.labels

    def fingerprint(self, sample: int = FINGERPRINT_SAMPLE) -> str:
        """sha256 of the count, every id in order and the preprocessed fields of up to `sample`
        evenly spaced rows (as `ArraySource.fingerprint`, reading only those rows)."""
        digest = hashlib.sha256(str(len(self)).encode())
        digest.update(np.ascontiguousarray(self.ids).tobytes())
        rows = fingerprint_rows(len(self), sample)
        for row in rows:
            example = self[int(row)]
            for key in sorted(example):
                digest.update(key.encode())
                digest.update(np.ascontiguousarray(example[key]).tobytes())
        return digest.hexdigest()

    def rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Examples start..stop-1 preprocessed and stacked (`preprocess_rows`), e.g. a chunk
        of the scoring pass."""
        return preprocess_rows(self.base, range(start, min(stop, len(self))), self.preprocessor)

    def take(self, indices: np.ndarray, name: str | None = None) -> StreamedSource:
        """The rows at `indices` (in that order), still streamed."""
        return StreamedSource(Subset(self.base, indices, name or "subset"), self.preprocessor)


def prepared(source: Source, preprocessor: Preprocessor, in_memory_limit: int) -> Source:
    """`source` preprocessed for the models: into memory (`materialize`) when it has at most
    `in_memory_limit` examples (`data.in_memory_limit`), else streamed (`StreamedSource`)."""
    if len(source) <= in_memory_limit:
        return materialize(source, preprocessor)
    logging.getLogger("alchemist_jax.data").info(
        "%s: %d samples > data.in_memory_limit=%d: streamed, preprocessed per read",
        source.name,
        len(source),
        in_memory_limit,
    )
    return StreamedSource(source, preprocessor)
