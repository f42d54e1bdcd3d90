"""The data layer: sources of (id, image, caption) examples, preprocessing, grain pipelines.

    source = alchemist_jax.data.load("pool", split="train")        # built-in, random access
    source = alchemist_jax.data.load("my/manifest.parquet")        # user data
    noisy, truth = alchemist_jax.data.corrupt(source, 0.3, seed=0) # benchmark defects
    batches = alchemist_jax.data.train_iterator(
        source, 64, seed=0, transform=Preprocessor(28, 1, 32))

See docs/DATA.md for the example schema and every kind of source.
"""

from __future__ import annotations

from alchemist_jax.data.corrupt import corrupt
from alchemist_jax.data.loading import BUILTIN_SOURCES, MANIFEST_SUFFIXES, load
from alchemist_jax.data.pipeline import eval_iterator, train_iterator
from alchemist_jax.data.preprocess import Preprocessor
from alchemist_jax.data.sources import ArraySource, Source
from alchemist_jax.data.splits import PreparedSplits, Splits, load_splits, load_test, prepare_splits

__all__ = [
    "ArraySource",
    "BUILTIN_SOURCES",
    "MANIFEST_SUFFIXES",
    "PreparedSplits",
    "Preprocessor",
    "Source",
    "Splits",
    "corrupt",
    "eval_iterator",
    "load",
    "load_splits",
    "load_test",
    "prepare_splits",
    "train_iterator",
]
