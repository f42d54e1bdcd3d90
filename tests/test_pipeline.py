"""Grain pipelines: determinism, per-epoch reshuffling, sharding, padded evaluation, resuming."""

import numpy as np
import pytest

from alchemist_jax.data.pipeline import eval_iterator, numeric_fields, train_iterator
from alchemist_jax.data.sources import ArraySource

FIRST_ID = 500


def make_source(n: int) -> ArraySource:
    """n examples with ids 500 + i and 4x4x1 images whose every pixel is i."""
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 4, 4, 1))
    return ArraySource(
        "test",
        FIRST_ID + np.arange(n),
        images.copy(),
        [f"caption {i}" for i in range(n)],
        labels=np.arange(n) % 3,
    )


def to_float(example):
    return {"image": example["image"].astype(np.float32) / 255.0, "label": example["label"]}


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def ids_of(batches):
    return np.concatenate([b["id"] for b in batches])


def assert_same_batches(left, right):
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_train_batches_have_fixed_shapes_and_consistent_fields():
    batch = next(train_iterator(make_source(103), 8, seed=0, transform=to_float))
    assert set(batch) == {"id", "image", "label"}
    assert batch["id"].shape == (8,) and batch["id"].dtype == np.int64
    assert batch["image"].shape == (8, 4, 4, 1) and batch["image"].dtype == np.float32
    # The image encodes the index, so it must agree with the id in every row.
    np.testing.assert_array_equal(batch["image"][:, 0, 0, 0] * 255.0, batch["id"] - FIRST_ID)
    np.testing.assert_array_equal(batch["label"], (batch["id"] - FIRST_ID) % 3)


def test_train_is_deterministic_in_the_seed():
    source = make_source(103)
    first = take(train_iterator(source, 8, seed=1, transform=to_float), 20)
    again = take(train_iterator(source, 8, seed=1, transform=to_float), 20)
    other = take(train_iterator(source, 8, seed=2, transform=to_float), 20)
    assert_same_batches(first, again)
    assert not np.array_equal(ids_of(first), ids_of(other))


def test_train_epochs_cover_every_example_once_and_reshuffle():
    n, batch_size = 96, 8
    epochs = ids_of(
        take(
            train_iterator(make_source(n), batch_size, seed=0, transform=to_float),
            3 * n // batch_size,
        )
    ).reshape(3, n)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), FIRST_ID + np.arange(n))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])
    assert not np.array_equal(epochs[0], np.sort(epochs[0]))


def test_train_shards_are_disjoint_and_cover_the_source():
    n = 100
    shards = [
        ids_of(
            take(
                train_iterator(
                    make_source(n), 10, seed=0, transform=to_float, shard_index=index, shard_count=2
                ),
                5,
            )
        )
        for index in range(2)
    ]
    for index, ids in enumerate(shards):
        np.testing.assert_array_equal(np.sort(ids), FIRST_ID + np.arange(index, n, 2))
    assert not set(shards[0]) & set(shards[1])


def test_train_default_transform_keeps_numeric_fields():
    batch = next(train_iterator(make_source(10), 4, seed=0, transform=None))
    assert set(batch) == {"id", "image", "label"}
    assert batch["image"].dtype == np.uint8
    assert set(numeric_fields(make_source(1)[0])) == {"id", "image", "label"}


def test_train_resumes_exactly_from_saved_state():
    source = make_source(103)
    iterator = train_iterator(source, 8, seed=3, transform=to_float)
    take(iterator, 17)  # past the first epoch boundary (103 / 8 < 13)
    state = iterator.get_state()
    expected = take(iterator, 6)
    fresh = train_iterator(source, 8, seed=3, transform=to_float)
    fresh.set_state(state)
    assert_same_batches(take(fresh, 6), expected)


@pytest.mark.parametrize("n, batch_size", [(103, 8), (96, 8), (5, 8)])
def test_eval_covers_every_example_once_in_order_with_padding(n, batch_size):
    batches = list(eval_iterator(make_source(n), batch_size, transform=to_float))
    assert len(batches) == -(-n // batch_size)
    for batch in batches:
        assert batch["image"].shape == (batch_size, 4, 4, 1)
        assert batch["mask"].dtype == bool and batch["mask"].shape == (batch_size,)
    mask = np.concatenate([b["mask"] for b in batches])
    ids = ids_of(batches)
    np.testing.assert_array_equal(ids[mask], FIRST_ID + np.arange(n))
    padding = len(mask) - n
    np.testing.assert_array_equal(mask, np.arange(len(mask)) < n)
    np.testing.assert_array_equal(ids[n:], np.full(padding, -1))
    # Padded rows repeat a real example, so they hold valid data.
    last = batches[-1]["image"][:, 0, 0, 0] * 255.0
    np.testing.assert_allclose(last[~batches[-1]["mask"]], n - 1)


def test_eval_shards_split_the_source_in_the_same_number_of_batches():
    n, batch_size = 103, 17  # shards of 52 and 51 examples: 4 batches each
    shards = [
        list(
            eval_iterator(
                make_source(n), batch_size, transform=to_float, shard_index=index, shard_count=2
            )
        )
        for index in range(2)
    ]
    assert [len(batches) for batches in shards] == [4, 4]
    for index, batches in enumerate(shards):
        ids, mask = ids_of(batches), np.concatenate([b["mask"] for b in batches])
        np.testing.assert_array_equal(ids[mask], FIRST_ID + np.arange(index, n, 2))
        np.testing.assert_array_equal(ids[~mask], -1)
        np.testing.assert_array_equal(mask, np.arange(4 * batch_size) < len(range(index, n, 2)))


def test_eval_resumes_exactly_from_saved_state():
    source = make_source(103)
    iterator = eval_iterator(source, 8, transform=to_float)
    take(iterator, 5)
    state = iterator.get_state()
    expected = list(iterator)
    fresh = eval_iterator(source, 8, transform=to_float)
    fresh.set_state(state)
    assert_same_batches(list(fresh), expected)
    assert len(expected) == 13 - 5


def test_invalid_shard_or_batch_size_is_rejected():
    with pytest.raises(ValueError, match="shard_index must be in"):
        train_iterator(make_source(10), 2, seed=0, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="is empty"):
        eval_iterator(make_source(1), 2, shard_index=1, shard_count=2)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        eval_iterator(make_source(10), 0)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        train_iterator(make_source(10), 0, seed=0)
