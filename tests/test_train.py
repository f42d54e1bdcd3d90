"""Downstream training: the loss falls, resuming is exact, selections and rating weights pick
the training data, the fixed-draw validation loss, and bad inputs fail naming the file."""

import json

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from alchemist_jax import models, training
from alchemist_jax.config import ConfigError, load_config
from alchemist_jax.data import prepare_splits

STEPS = 30  # every run has the same length: one compiled training step for the whole file
TINY = [
    "data.pool.train_size=200",
    "data.pool.validation_size=64",
    "data.max_text_length=16",
    "model.width=32",
    "model.depth=1",
    "model.heads=2",
    "model.text_width=32",
    "model.text_depth=1",
    "model.text_heads=2",
    "model.patch_size=7",
    "train.batch_size=16",
    f"train.steps={STEPS}",
    "train.warmup_steps=3",
    "train.learning_rate=0.003",
    "train.eval_every=10",
    "train.checkpoint_every=10",
]


@pytest.fixture(scope="module")
def cfg():
    return load_config("configs/demo.yaml", TINY)


@pytest.fixture(scope="module")
def data(cfg, tmp_path_factory):
    return prepare_splits(cfg.data, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def full_run(cfg, data, tmp_path_factory):
    """An uninterrupted run on the pool: (workdir, final model)."""
    workdir = tmp_path_factory.mktemp("full")
    trained = training.train_model(
        cfg, data.pool, workdir, steps=STEPS, seed=0, validation=data.validation
    )
    return workdir, trained


def _assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _config_section(workdir, section):
    return yaml.safe_load((workdir / "config.yaml").read_text())[section]


def test_training_lowers_the_loss_of_a_tiny_overfit_problem(cfg, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    few = data.pool.take(np.arange(16))
    initial = training.train_model(cfg, few, None, steps=STEPS, seed=0, stop_after=0)
    trained = training.train_model(cfg, few, None, steps=STEPS, seed=0)
    before = training.validation_loss(initial, few, 16, seed=1, draws=4)
    after = training.validation_loss(trained, few, 16, seed=1, draws=4)
    assert after < 0.8 * before, (before, after)  # measured: 1.794 -> 1.289
    assert not list(tmp_path.iterdir())  # workdir None: no files


def test_metrics_resume_and_load_trained(cfg, data, full_run, tmp_path):
    full, trained = full_run
    rows = _metrics(full)
    assert [(r["step"], sorted(r)) for r in rows] == [
        (s, ["step", key]) for s in (10, 20, 30) for key in ("train_loss", "val_loss")
    ]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert val[2] < val[0] < 1.6
    assert _config_section(full, "train")["steps"] == STEPS

    split = tmp_path / "split"
    training.train_model(
        cfg, data.pool, split, steps=STEPS, seed=0, validation=data.validation, stop_after=13
    )  # checkpoints at 10 and 13
    with pytest.raises(ValueError, match="unfinished: it reached step 13 of 30"):
        training.load_trained(cfg, split)
    with pytest.raises(ConfigError, match=r"holds a different config \(section train\)"):
        training.train_model(
            load_config("configs/demo.yaml", TINY + ["train.weight_decay=0.1"]),
            data.pool,
            split,
            steps=STEPS,
            seed=0,
        )
    with pytest.raises(ValueError, match="holds a run on other training data"):
        training.train_model(cfg, data.pool.take(np.arange(100)), split, steps=STEPS, seed=0)
    # Another evaluate section does not block resuming; the run ends bitwise-equal.
    other_eval = load_config("configs/demo.yaml", TINY + ["evaluate.loss_draws=2"])
    resumed = training.train_model(
        other_eval, data.pool, split, steps=STEPS, seed=0, validation=data.validation
    )
    _assert_same_params(resumed.params, trained.params)
    assert _metrics(split) == rows
    _assert_same_params(training.load_trained(cfg, split).params, trained.params)


def test_bad_runs_fail_before_writing(cfg, data, tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path} holds no checkpoint of a train run"):
        training.load_trained(cfg, tmp_path)
    with pytest.raises(ConfigError, match=r"train.warmup_steps=3 must be in \[0, 3\)"):
        training.train_model(cfg, data.pool, tmp_path / "run", steps=3, seed=0)
    assert not (tmp_path / "run").exists()


def test_validation_loss_is_the_fixed_draw_mean_at_any_batch_size(data, full_run):
    _, trained = full_run
    validation = data.validation
    value = training.validation_loss(trained, validation, 16, seed=3, draws=2)
    assert training.validation_loss(trained, validation, 24, seed=3, draws=2) == pytest.approx(
        value, rel=1e-6
    )  # 3 batches, the last one padded
    assert training.validation_loss(trained, validation, 16, seed=4, draws=2) != pytest.approx(
        value, rel=1e-4
    )
    # Reference: draw d of the example with id i from fold_in(fold_in(key(3), d), i).
    batch = {
        k: np.stack([validation[i][k] for i in range(len(validation))])
        for k in ("image", "tokens", "token_mask")
    }
    forward = jax.jit(
        lambda params, t, eps: models.flow_matching_loss_at(
            training.Trained(trained.graphdef, params, trained.rest).module(), batch, t, eps
        )
    )
    losses = []
    for draw in range(2):
        keys = [
            jax.random.split(
                jax.random.fold_in(jax.random.fold_in(jax.random.key(3), draw), int(i))
            )
            for i in validation.ids
        ]
        t = np.array([jax.random.uniform(k[0], ()) for k in keys])
        eps = np.stack([jax.random.normal(k[1], (28, 28, 1)) for k in keys])
        losses.append(np.asarray(forward(trained.params, t, eps)))
    assert value == pytest.approx(np.mean(losses), rel=1e-5)


def test_selection_trains_only_on_the_selected_ids(cfg, data, tmp_path, monkeypatch):
    chosen = data.pool.ids[::5]
    path = tmp_path / "selection.parquet"
    pq.write_table(pa.table({"id": chosen[::-1]}), path)  # order in the file does not matter
    seen = []

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def __next__(self):
            batch = next(self.inner)
            seen.extend(batch["id"].tolist())
            return batch

        def get_state(self):
            return self.inner.get_state()

    original = training.pipeline.train_iterator
    monkeypatch.setattr(
        training.pipeline,
        "train_iterator",
        lambda *args, **kwargs: Recording(original(*args, **kwargs)),
    )
    final = training.run(cfg, tmp_path / "run", selection=path)
    assert final["steps"] == STEPS and final["train_size"] == 40
    assert np.isfinite(final["train_loss"]) and np.isfinite(final["val_loss"])
    assert len(seen) == STEPS * 16 and set(seen) == set(chosen.tolist())
    assert final["val_loss"] == _metrics(tmp_path / "run")[-1]["val_loss"]


def test_selection_and_ratings_errors_name_the_file(data, tmp_path):
    pool = data.pool
    cases = [
        (
            "sel.parquet",
            {"sample": [1, 2]},
            training.read_selection,
            r"sel.parquet has no column 'id' \(columns: sample\)",
        ),
        (
            "sel.parquet",
            {"id": [int(pool.ids[0]), 10**9, 10**9 + 1]},
            training.read_selection,
            r"sel.parquet: 2 of its ids are not in the pool \(e.g. id 1000000000\)",
        ),
        (
            "sel.parquet",
            {"id": [int(pool.ids[3])] * 2},
            training.read_selection,
            f"sel.parquet: id {pool.ids[3]} appears 2 times",
        ),
        (
            "r.parquet",
            {"id": pool.ids},
            training.read_rating_weights,
            "r.parquet has no column 'score'",
        ),
        (
            "r.parquet",
            {"id": pool.ids[1:], "score": np.zeros(len(pool) - 1)},
            training.read_rating_weights,
            f"r.parquet: 1 pool ids are missing \\(e.g. id {pool.ids[0]}\\); every pool id needs a "
            "row",
        ),
    ]
    for name, columns, reader, message in cases:
        pq.write_table(pa.table(columns), tmp_path / name)
        with pytest.raises(ValueError, match=message):
            reader(tmp_path / name, pool)


def test_ratings_become_exp_z_weights(data, tmp_path):
    z = np.array([-1.0, 0.0, 1.0]) * np.sqrt(1.5)  # z-scores of 1, 2, 3 (std sqrt(2/3))
    np.testing.assert_allclose(
        training.rating_weights(np.array([1.0, 2.0, 3.0])), np.exp(z - z[2]), rtol=1e-12
    )
    np.testing.assert_array_equal(training.rating_weights(np.full(4, 7.0)), np.ones(4))
    pool = data.pool
    scores = np.arange(len(pool), dtype=np.float32)
    path = tmp_path / "ratings.parquet"
    pq.write_table(pa.table({"id": pool.ids[::-1], "score": scores[::-1]}), path)
    np.testing.assert_allclose(
        training.read_rating_weights(path, pool), training.rating_weights(scores), rtol=1e-12
    )


def test_weighted_sampling_follows_the_weights():
    weights = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    p = training.sampling_probabilities(weights, 5)
    np.testing.assert_array_equal(p, weights / 10)
    draws = np.concatenate([training.weighted_batch_indices(p, 7, n, 64) for n in range(1000)])
    counts = np.bincount(draws, minlength=5)
    expected = p * len(draws)  # 64,000 draws: 0, 6400, 12800, 19200, 25600
    assert counts[0] == 0
    np.testing.assert_array_less(np.abs(counts - expected), 4 * np.sqrt(expected * (1 - p)) + 1)
    np.testing.assert_array_equal(training.weighted_batch_indices(p, 7, 3, 64), draws[192:256])
    assert not np.array_equal(training.weighted_batch_indices(p, 8, 3, 64), draws[192:256])
    with pytest.raises(ValueError, match="must be finite, >= 0 and not all zero"):
        training.sampling_probabilities(np.array([1.0, -1.0]), 2)


def test_weighted_batches_resume_from_their_position(data):
    weights = np.linspace(0.0, 1.0, len(data.pool))
    batches = training.WeightedBatches(data.pool, weights, 8, seed=0)
    next(batches)
    state = batches.get_state()
    expected = next(batches)
    fresh = training.WeightedBatches(data.pool, weights, 8, seed=0)
    fresh.set_state(state)
    again = next(fresh)
    assert state == {"position": 1}
    np.testing.assert_array_equal(again["id"], expected["id"])
    np.testing.assert_array_equal(again["image"], expected["image"])
    assert data.pool.ids[0] not in expected["id"]  # weight 0
