"""Streamed splits (`data.in_memory_limit`): the same examples, batches and scores as the splits
preprocessed into memory, without holding the pool."""

import numpy as np
import pyarrow.parquet as pq
from test_rate import TINY

from alchemist_jax import scoring
from alchemist_jax.config import load_config
from alchemist_jax.data import pipeline, prepare_splits
from alchemist_jax.data.preprocess import StreamedSource
from alchemist_jax.data.sources import ArraySource


def test_streamed_splits_hold_the_examples_and_batches_of_the_materialized_ones():
    in_memory = prepare_splits(load_config("configs/demo.yaml", TINY).data)
    streamed = prepare_splits(
        load_config("configs/demo.yaml", [*TINY, "data.in_memory_limit=95"]).data
    )
    assert isinstance(in_memory.pool, ArraySource) and isinstance(streamed.pool, StreamedSource)
    assert isinstance(streamed.validation, ArraySource)  # 32 samples <= 95
    np.testing.assert_array_equal(streamed.pool.ids, in_memory.pool.ids)
    np.testing.assert_array_equal(streamed.pool.labels, in_memory.pool.labels)
    for index in (0, 17, 95):
        expected, got = in_memory.pool[index], streamed.pool[index]
        assert sorted(got) == sorted(pipeline.numeric_fields(expected))
        for key in got:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    take = lambda pool: [
        next(it) for it in [pipeline.train_iterator(pool, 16, seed=3)] for _ in range(8)
    ]  # noqa: E731
    for left, right in zip(take(in_memory.pool), take(streamed.pool)):
        assert left.keys() == right.keys()
        for key in left:
            np.testing.assert_array_equal(left[key], right[key], err_msg=key)
    subset = streamed.pool.take(np.array([5, 2, 70]))
    np.testing.assert_array_equal(subset.ids, in_memory.pool.ids[[5, 2, 70]])
    np.testing.assert_array_equal(subset[1]["image"], in_memory.pool[2]["image"])
    assert streamed.pool.fingerprint() == streamed.pool.fingerprint()
    assert streamed.pool.fingerprint() != subset.fingerprint()


def test_a_streamed_scoring_pass_writes_the_in_memory_file(tmp_path):
    overrides = [*TINY, "score.scorer=clarity", "score.batch_size=16", "score.chunk_size=40"]
    for name, extra in (("memory", []), ("streamed", ["data.in_memory_limit=0"])):
        scoring.run(
            load_config("configs/demo.yaml", overrides + extra), tmp_path / f"{name}.parquet"
        )
    memory, streamed = (pq.read_table(tmp_path / f"{n}.parquet") for n in ("memory", "streamed"))
    assert streamed.equals(memory)
    assert streamed.schema.metadata == memory.schema.metadata
