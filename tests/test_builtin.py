"""Built-in real-image sources: sizes, real content, stable ids, disjoint pool splits."""

import numpy as np
import pytest

from alchemist_jax import data
from alchemist_jax.config import DataConfig, PoolConfig
from alchemist_jax.data import builtin


def _nearest_centroid_accuracy(train, test):
    """Accuracy of a nearest-class-mean classifier on raw pixels (a content check)."""
    x = train.images.reshape(len(train), -1).astype(np.float64)
    classes = np.unique(train.labels)
    centroids = np.stack([x[train.labels == c].mean(0) for c in classes])
    xt = test.images.reshape(len(test), -1).astype(np.float64)
    distances = (xt**2).sum(1)[:, None] - 2 * xt @ centroids.T + (centroids**2).sum(1)[None]
    return float(np.mean(classes[distances.argmin(1)] == test.labels))


def test_mnist_sizes_ids_and_content():
    splits = {s: data.load("mnist", s) for s in builtin.SPLITS}
    assert [len(splits[s]) for s in builtin.SPLITS] == [50_000, 10_000, 10_000]
    assert np.array_equal(
        np.concatenate([splits[s].ids for s in builtin.SPLITS]), np.arange(70_000)
    )
    train = splits["train"]
    assert train.images.shape == (50_000, 28, 28, 1) and train.images.dtype == np.uint8
    # The classic file: first labels 5 0 4 1 9 2 1 3 1 4, mean intensity 0.1307 of full scale.
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert train.images.mean() / 255 == pytest.approx(0.1307, abs=0.001)
    assert np.bincount(train.labels).tolist()[:3] == [4932, 5678, 4968]
    # Nearest class mean on pixels is ~82% on real MNIST (10% for noise).
    assert _nearest_centroid_accuracy(train, splits["test"]) == pytest.approx(0.82, abs=0.01)


def test_animals_sizes_ids_and_content():
    train, validation, test = (data.load("animals", s) for s in builtin.SPLITS)
    assert (len(train), len(validation), len(test)) == (8000, 1000, 1000)
    all_ids = np.concatenate([train.ids, validation.ids, test.ids])
    assert np.array_equal(np.sort(all_ids), np.arange(100_000, 110_000))
    assert np.bincount(train.labels - 10).tolist() == [800] * 10  # stratified
    assert np.bincount(test.labels - 10).tolist() == [100] * 10
    assert train.images.shape[1:] == (28, 28, 1)
    assert 60 < train.images.mean() < 80  # white silhouettes on black
    assert 0.5 < _nearest_centroid_accuracy(train, test) < 0.7
    example = test[0]
    assert example["caption"] and builtin.ANIMALS[example["label"] - 10] in example["caption"]
    assert example["source"] == "animals"


def test_ids_and_captions_are_stable_across_loads():
    first, second = data.load("pool", "train"), data.load("pool", "train")
    assert np.array_equal(first.ids, second.ids)
    assert first.captions == second.captions
    assert np.array_equal(first.images, second.images)
    assert first[5]["caption"] == builtin.caption_for(int(first[5]["label"]), int(first[5]["id"]))


def test_pool_splits_are_disjoint_and_balanced():
    config = DataConfig(pool=PoolConfig(train_size=2001, validation_size=300, test_size=300))
    pools = {s: data.load("pool", s, config=config) for s in builtin.SPLITS}
    assert [len(pools[s]) for s in builtin.SPLITS] == [2001, 300, 300]
    id_sets = [set(pools[s].ids.tolist()) for s in builtin.SPLITS]
    assert not (id_sets[0] & id_sets[1]) and not (id_sets[0] & id_sets[2])
    assert not (id_sets[1] & id_sets[2])
    train = pools["train"]
    assert int((train.ids < 100_000).sum()) == 1001  # MNIST takes the extra one
    assert set(np.unique(train.labels)) == set(range(20))
    # A smaller pool is a subset of a larger one (fixed permutation).
    larger = data.load("pool", "train", config=DataConfig(pool=PoolConfig(train_size=4000)))
    assert set(train.ids.tolist()) <= set(larger.ids.tolist())


def test_pool_too_large_and_bad_split():
    with pytest.raises(ValueError, match=r"lower data.pool.validation_size"):
        data.load("pool", "validation", config=DataConfig(pool=PoolConfig(validation_size=2002)))
    with pytest.raises(
        ValueError,
        match=r"unknown split 'valid'; valid splits: train, "
        r"validation, test",
    ):
        data.load("mnist", "valid")
    with pytest.raises(ValueError, match=r"'nope' is neither a built-in"):
        data.load("nope")


def test_captions_have_at_least_six_phrasings_per_source():
    for templates in (builtin.MNIST_TEMPLATES, builtin.ANIMAL_TEMPLATES):
        assert len(set(templates)) >= 6
    train = data.load("pool", "train")
    for origin, label in (("mnist", 3), ("animals", 12)):
        captions = {c for c, lab in zip(train.captions, train.labels) if lab == label}
        assert len(captions) >= 6, (origin, captions)
    assert builtin.caption_for(3, 0) != "" and "cat" in builtin.caption_for(12, 100_001)
