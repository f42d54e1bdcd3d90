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


def test_train_rows_of_processes_partition_the_global_batches():
    """Two processes reading rows 0..4 and 5..9 of each global batch of 10 together see exactly
    the batches one process reading all rows sees (the global order does not depend on the
    process layout), in the same state after as many batches."""
    source = make_source(100)
    whole = take(train_iterator(source, 10, seed=0, transform=to_float), 15)
    halves = [
        take(train_iterator(source, 10, seed=0, rows=rows, transform=to_float), 15)
        for rows in (range(0, 5), range(5, 10))
    ]
    for batch, first, second in zip(whole, *halves):
        for key in batch:
            np.testing.assert_array_equal(batch[key], np.concatenate([first[key], second[key]]))
    strided = take(train_iterator(source, 10, seed=0, rows=[1, 4, 9], transform=to_float), 15)
    np.testing.assert_array_equal(
        ids_of(strided), np.stack([b["id"][[1, 4, 9]] for b in whole]).ravel()
    )


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


def test_eval_rows_split_each_padded_global_batch():
    n, batch_size = 103, 16  # 7 global batches, the last with 7 real rows and 9 padding rows
    whole = list(eval_iterator(make_source(n), batch_size, transform=to_float))
    parts = [
        list(eval_iterator(make_source(n), batch_size, rows=rows, transform=to_float))
        for rows in (range(0, 8), range(8, 16))
    ]
    assert [len(p) for p in parts] == [7, 7] and len(whole) == 7
    for batch, first, second in zip(whole, *parts):
        for key in batch:
            np.testing.assert_array_equal(batch[key], np.concatenate([first[key], second[key]]))
    mask = np.concatenate([b["mask"] for b in parts[1]])
    np.testing.assert_array_equal(ids_of(parts[1])[~mask], -1)
    assert mask.sum() == 6 * 8  # positions 8..15 exist in the 6 full batches only


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


def test_invalid_rows_or_batch_size_are_rejected():
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 2\)"):
        train_iterator(make_source(10), 2, seed=0, rows=[2])
    with pytest.raises(ValueError, match="rows must be increasing"):
        eval_iterator(make_source(10), 4, rows=[1, 1])
    with pytest.raises(ValueError, match="is empty"):
        eval_iterator(make_source(0), 2)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        eval_iterator(make_source(10), 0)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        train_iterator(make_source(10), 0, seed=0)
