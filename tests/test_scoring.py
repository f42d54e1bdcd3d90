"""The scoring pass: chunked resumable driver, heuristic and proxy scorers against reference
computations, the rater scorer against the rating run's own scoring, user errors."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest
from flax import nnx
from test_rate import TINY

from alchemist_jax import cli, models, rating, scoring, training
from alchemist_jax import config as config_lib
from alchemist_jax.config import load_config
from alchemist_jax.data import pipeline, prepare_splits
from alchemist_jax.data.sources import ArraySource
from alchemist_jax.runtime import checkpoints, parallel


def _source(n: int) -> ArraySource:
    rng = np.random.default_rng(0)
    ids = rng.permutation(10 * n)[:n] + 1000  # not sorted: the output follows the pool's order
    return ArraySource(
        "synthetic",
        ids,
        None,
        None,
        extra={"image": rng.uniform(-1, 1, (n, 4, 4, 1)).astype(np.float32)},
    )


def _mean_pixel(batch):
    return batch["image"].mean(axis=(1, 2, 3)) + 1e-3 * batch["id"]


class Interrupted(Exception):
    """Stands for a killed scoring process."""


META = {"scorer": "test", "config_sha256": "abc", "source": "synthetic", "count": "50"}


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, chunk, batch", [(50, 16, 7), (48, 16, 8), (5, 16, 7), (16, 3, 4)])
def test_score_pool_covers_every_id_once_in_pool_order(tmp_path, n, chunk, batch):
    source = _source(n)
    out = tmp_path / "ratings.parquet"
    scores = scoring.score_pool(
        _mean_pixel, source, out, batch_size=batch, chunk_size=chunk, metadata=META
    )
    table = pq.read_table(out)
    assert table.schema.field("id").type == "int64" and table.schema.field("score").type == "float"
    np.testing.assert_array_equal(table.column("id").to_numpy(), source.ids)
    images = np.stack([source[i]["image"] for i in range(n)])
    expected = _mean_pixel({"image": images, "id": source.ids})
    np.testing.assert_allclose(table.column("score").to_numpy(), expected, rtol=1e-6)
    np.testing.assert_array_equal(scores, table.column("score").to_numpy())
    assert scoring.read_metadata(out) == META
    assert not scoring.chunk_folder(out).exists()


def test_batches_are_laid_out_like_eval_iterator_batches():
    source = ArraySource(
        "labelled",
        np.arange(11) + 5,
        np.zeros((11, 2, 2, 1), np.uint8),
        [f"c{i}" for i in range(11)],
        labels=np.arange(11) % 3,
        extra={"latent": np.random.default_rng(0).normal(size=(11, 3))},
    )
    ours = list(pipeline.padded_batches(scoring.pool_columns(source, 0, 11), 4))
    theirs = list(pipeline.eval_iterator(source, 4))
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs):
        assert sorted(a) == sorted(b) == ["id", "image", "label", "latent", "mask"]
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
            assert a[key].dtype == b[key].dtype, key


def test_interrupted_run_resumes_to_the_same_file(tmp_path):
    source = _source(50)
    whole, split = tmp_path / "whole.parquet", tmp_path / "split.parquet"
    args = dict(batch_size=7, chunk_size=16, metadata=META)
    scoring.score_pool(_mean_pixel, source, whole, **args)

    calls = []

    def counting(batch):
        calls.append(batch["id"])
        return _mean_pixel(batch)

    def failing(batch):  # chunks of 21 rows (16 rounded up to 3 batches of 7): call 7 starts
        if len(calls) == 6:
            raise Interrupted
        return counting(batch)

    with pytest.raises(Interrupted):
        scoring.score_pool(failing, source, split, **args)
    folder = scoring.chunk_folder(split)  # chunk 2 was never finished
    assert sorted(p.name for p in folder.glob("*.parquet")) == ["00000.parquet", "00001.parquet"]
    assert not split.exists()
    # A chunk left by another pool (other ids) is scored again, not trusted.
    shutil.copy(folder / "00000.parquet", folder / "00001.parquet")
    calls.clear()
    scoring.score_pool(counting, source, split, **args)
    assert len(calls) == 3 + 2  # chunk 1 (its ids did not match) and chunk 2 (8 rows)
    assert split.read_bytes() == whole.read_bytes()
    assert scoring.read_metadata(split) == scoring.read_metadata(whole) == META
    assert pq.read_table(split).equals(pq.read_table(whole))

    calls.clear()  # complete: nothing to do
    scoring.score_pool(counting, source, split, **args)
    assert calls == []
    calls.clear()  # other metadata (another config): everything is scored again
    scoring.score_pool(_mean_pixel, source, split, **{**args, "metadata": {**META, "count": "x"}})
    assert scoring.read_metadata(split)["count"] == "x"


def test_padded_batches_without_ids_and_of_nothing():
    rows = {"pair": np.arange(10).reshape(5, 2)}
    batches = list(pipeline.padded_batches(rows, 2))
    assert [b["mask"].tolist() for b in batches] == [[True, True], [True, True], [True, False]]
    np.testing.assert_array_equal(batches[-1]["pair"], [[8, 9], [8, 9]])
    assert sorted(batches[-1]) == ["mask", "pair"]
    assert list(pipeline.padded_batches({"pair": np.zeros((0, 2))}, 2)) == []
    with pytest.raises(ValueError, match="batch_size must be positive"):
        next(pipeline.padded_batches(rows, 0))


def test_scorer_dispatch_covers_exactly_the_configs_scorers():
    assert len(scoring.SCORERS) == len(config_lib.SCORERS)
    assert set(scoring.SCORERS) == set(config_lib.SCORERS)
    assert set(scoring.HEURISTICS) == set(config_lib.HEURISTIC_SCORERS)


# ----------------------------------------------------------------------------------------------
# Heuristics against numpy references
# ----------------------------------------------------------------------------------------------


def _laplacian_ref(gray):
    return (
        gray[:-2, 1:-1] + gray[2:, 1:-1] + gray[1:-1, :-2] + gray[1:-1, 2:] - 4 * gray[1:-1, 1:-1]
    )


def _sobel_ref(gray):
    gx = (
        gray[:-2, 2:]
        + 2 * gray[1:-1, 2:]
        + gray[2:, 2:]
        - gray[:-2, :-2]
        - 2 * gray[1:-1, :-2]
        - gray[2:, :-2]
    )
    gy = (
        gray[2:, :-2]
        + 2 * gray[2:, 1:-1]
        + gray[2:, 2:]
        - gray[:-2, :-2]
        - 2 * gray[:-2, 1:-1]
        - gray[:-2, 2:]
    )
    return np.hypot(gx, gy)


def _low_frequency_ref(gray):
    """Explicit DFT by matrices (no FFT), frequencies in cycles per pixel."""
    h, w = gray.shape
    dft = lambda n: np.exp(-2j * np.pi * np.outer(np.arange(n), np.arange(n)) / n)  # noqa: E731
    power = np.abs(dft(h) @ (gray - gray.mean()) @ dft(w).T) ** 2
    freq = lambda n: np.where(np.arange(n) < n / 2, np.arange(n), np.arange(n) - n) / n  # noqa
    low = np.hypot(*np.meshgrid(freq(h), freq(w), indexing="ij")) <= 0.125
    return (power[low].sum() + 1e-6) / (power.sum() + 1e-6)


def test_heuristics_match_numpy_references():
    images = np.random.default_rng(0).uniform(-1, 1, (4, 20, 24, 3)).astype(np.float32)
    images[1] *= 0.2  # low contrast: no gradient above the threshold
    grays = images.astype(np.float64).mean(axis=-1)
    np.testing.assert_allclose(
        scoring.clarity(images), [_laplacian_ref(g).var() for g in grays], rtol=1e-5
    )
    np.testing.assert_allclose(
        scoring.edge_density(images),
        [(_sobel_ref(g) > scoring.EDGE_THRESHOLD).mean() for g in grays],
    )
    np.testing.assert_allclose(
        scoring.low_frequency_energy(images), [_low_frequency_ref(g) for g in grays], rtol=1e-4
    )
    edges = np.asarray(scoring.edge_density(images))
    assert edges[1] == 0 and 0.1 < edges.min(initial=1, where=edges > 0) < edges.max() < 0.5


def test_heuristics_on_known_images():
    size = 28
    constant = np.full((size, size, 1), 0.3, np.float32)
    rows, cols = np.indices((size, size))
    checker = np.where((rows // 4 + cols // 4) % 2, 1.0, -1.0)[..., None].astype(np.float32)
    ramp = np.broadcast_to(np.linspace(-1, 1, size, dtype=np.float32), (size, size))[..., None]
    noise = np.random.default_rng(1).uniform(-1, 1, (size, size, 1)).astype(np.float32)
    images = np.stack([constant, checker, ramp, noise])
    clarity, edges, low = (
        np.asarray(f(images))
        for f in (scoring.clarity, scoring.edge_density, scoring.low_frequency_energy)
    )
    assert clarity[0] == 0 and edges[0] == 0 and low[0] == pytest.approx(1.0)
    # A pixel beside a square border is an edge pixel (gradient 8 > 2): 12 of the 26 valid
    # rows lie beside a horizontal border, 12 of the 26 columns beside a vertical one.
    assert edges[1] == pytest.approx(1 - (14 / 26) ** 2) and clarity[1] > 1.0
    assert edges[2] == 0 and clarity[2] < 1e-10  # a ramp: no curvature, Sobel 8 (2/27) < 2
    assert low[2] > 0.8 and low[3] < 0.15  # smooth vs white noise (area ratio ~0.05)
    # Scores are oriented higher = better: the noise image beats the ramp on low_frequency.
    score = scoring.HEURISTICS["low_frequency"](images)
    assert score[3] > score[2] and float(score[2]) == pytest.approx(-low[2])


# ----------------------------------------------------------------------------------------------
# Proxy scorers against direct computations with a DiT
# ----------------------------------------------------------------------------------------------


def _perturbed(params, scale: float):
    """`params` plus independent N(0, scale^2) noise on every entry."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(
        treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )


@pytest.fixture(scope="module")
def dit():
    """A tiny DiT with perturbed parameters (at initialisation it outputs exactly zero)."""
    cfg = load_config("configs/demo.yaml", TINY)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.uniform(-1, 1, (3, 28, 28, 1)).astype(np.float32),
        "tokens": rng.integers(0, 49406, (3, 16)).astype(np.int32),
        "token_mask": np.arange(16)[None].repeat(3, 0) < np.array([[5], [9], [16]]),
    }
    graphdef, params, rest = models.init_proxy(cfg.model, batch, jax.random.key(0), 16)
    return graphdef, _perturbed(params, 0.05), rest, batch


IDS = np.array([5, 2**33 + 7, 11], np.int64)


def _direct_statistics(dit, seed, draws):
    """(3, draws, 3): loss, L2 error norm and gradient norm, computed sample by sample."""
    graphdef, params, rest, batch = dit

    @jax.jit
    def one_sample(row, t, eps):  # row: a batch of 1
        def loss(p):
            return models.flow_matching_loss_at(nnx.merge(graphdef, p, rest), row, t, eps)[0]

        x_t = (1 - t) * row["image"] + t * eps
        error = nnx.merge(graphdef, params, rest)(x_t, t, row, None) - (eps - row["image"])
        grads = jax.grad(loss)(params)
        return jnp.stack(
            [
                loss(params),
                jnp.sqrt(jnp.sum(jnp.square(error))),
                jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))),
            ]
        )

    low, high = models.split_ids(IDS)
    out = np.zeros((3, draws, 3))
    for d in range(draws):
        t, eps = models.fixed_draws(seed, d, low, high, (28, 28, 1))
        for i in range(3):
            out[:, d, i] = one_sample(
                {k: v[i : i + 1] for k, v in batch.items()}, t[i : i + 1], eps[i : i + 1]
            )
    return out


def test_proxy_scores_match_direct_computation(dit):
    graphdef, params, rest, batch = dit
    direct = _direct_statistics(dit, seed=3, draws=2)
    assert direct[0].std(axis=0).min() > 0  # the draws differ
    for kind, statistic in zip(("loss", "el2n", "grand"), direct):
        score = scoring.proxy_score_fn(kind, graphdef, rest, draws=2, seed=3)
        np.testing.assert_allclose(
            score(params, batch, *models.split_ids(IDS)),
            -statistic.mean(axis=0),
            rtol=2e-5,
            err_msg=kind,
        )


def test_fixed_draws_depend_on_the_id_only():
    low, high = models.split_ids(np.array([7, 3, 2**32 + 7]))
    t, eps = models.fixed_draws(0, 1, low, high, (2, 2, 1))
    t_alone, eps_alone = models.fixed_draws(0, 1, low[1:2], high[1:2], (2, 2, 1))
    assert float(t[1]) == float(t_alone[0]) and np.array_equal(eps[1], eps_alone[0])
    assert len(set(np.asarray(t).tolist())) == 3  # ids 7 and 2**32 + 7 do not collide
    t_other, _ = models.fixed_draws(0, 2, low, high, (2, 2, 1))
    assert not np.allclose(t, t_other)


def test_proxy_scores_do_not_depend_on_batch_size(dit, tmp_path):
    graphdef, params, rest, _ = dit
    rng = np.random.default_rng(2)
    n = 70
    source = ArraySource(
        "synthetic",
        np.arange(n) * 3,
        None,
        None,
        extra={
            "image": rng.uniform(-1, 1, (n, 28, 28, 1)).astype(np.float32),
            "tokens": rng.integers(0, 49406, (n, 16)).astype(np.int32),
            "token_mask": np.ones((n, 16), bool),
        },
    )
    score = scoring.proxy_score_fn("loss", graphdef, rest, draws=2, seed=0)
    score_batch = lambda b: score(
        params,
        parallel.model_inputs(b),  # noqa: E731
        *models.split_ids(b["id"]),
    )
    small, large = (
        scoring.score_pool(
            score_batch,
            source,
            tmp_path / f"{b}.parquet",
            batch_size=b,
            chunk_size=32,
            metadata=META,
        )
        for b in (7, 64)
    )
    np.testing.assert_allclose(small, large, rtol=1e-6, atol=1e-6)
    # Same draws as the validation loss of training: its mean over the set is -mean(score).
    trained = training.Trained(graphdef, params, rest)
    assert training.validation_loss(trained, source, 16, seed=0, draws=2) == pytest.approx(
        -float(np.mean(large)), rel=1e-5
    )


# ----------------------------------------------------------------------------------------------
# The rater scorer and the command
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rating_run(tmp_path_factory):
    """A rating run folder as `rating.run` leaves it (config.yaml, an orbax checkpoint of the
    whole state at meta-step 2), written with rate's own helpers, with an EMA rater that
    differs from the current rater. (Running meta-steps would add ~30 s of tracing.)"""
    workdir = tmp_path_factory.mktemp("rate")
    cfg = load_config("configs/demo.yaml", TINY)
    config_lib.write_run_config(cfg, workdir, ())
    data = prepare_splits(cfg.data, workdir)
    example = {k: np.stack([v] * 8) for k, v in parallel.model_inputs(data.pool[0]).items()}
    program = rating.build_program(cfg, example, parallel.make_mesh())
    state = program.init_state(jax.random.key(0))
    state["rater_ema"] = _perturbed(state["rater"], 0.1)
    manager = checkpoints.manager(workdir / "checkpoints")
    checkpoints.save(manager, 2, state, {"batches": {"train": {}, "validation": {}}})
    manager.wait_until_finished()
    return workdir, program, state, data


def test_rater_scores_equal_the_rating_runs_own_scores(rating_run, tmp_path):
    workdir, program, state, data = rating_run
    outs = {batch: tmp_path / f"ratings{batch}.parquet" for batch in (7, 64)}
    summaries = {
        batch: scoring.run(
            load_config(
                "configs/demo.yaml",
                TINY + ["score.scorer=rater", "score.chunk_size=40", f"score.batch_size={batch}"],
            ),
            out,
            rater_dir=workdir,
        )
        for batch, out in outs.items()
    }
    small, large = (pq.read_table(outs[b]) for b in (7, 64))
    np.testing.assert_allclose(
        small.column("score").to_numpy(), large.column("score").to_numpy(), rtol=1e-6, atol=1e-6
    )
    expected = rating.score_source(program, state["rater_ema"], data.pool, 16)
    np.testing.assert_array_equal(large.column("id").to_numpy(), data.pool.ids)
    np.testing.assert_allclose(large.column("score").to_numpy(), expected, rtol=1e-6, atol=1e-6)
    not_ema = rating.score_source(program, state["rater"], data.pool, 16)
    assert np.abs(not_ema - expected).max() > 1e-3  # the EMA parameters were the ones used

    metadata = scoring.read_metadata(outs[64])
    assert metadata["scorer"] == "rater" and metadata["rater_step"] == "2"
    assert metadata["rater_checkpoint"] == str((workdir / "checkpoints").absolute())
    assert metadata["count"] == "96" and len(metadata["config_sha256"]) == 64
    assert metadata == scoring.read_metadata(outs[7])  # the batch size changes nothing
    assert summaries[64]["count"] == 96
    assert summaries[64]["score_mean"] == pytest.approx(float(expected.mean()), abs=1e-6)


def test_heuristic_run_writes_and_then_skips(tmp_path):
    cfg = load_config(
        "configs/demo.yaml",
        TINY + ["score.scorer=clarity", "score.batch_size=16", "score.chunk_size=40"],
    )
    out = tmp_path / "ratings" / "clarity.parquet"
    first = scoring.run(cfg, out)
    assert first["count"] == 96 and first["samples_per_s"] > 0
    assert scoring.read_metadata(out)["scorer"] == "clarity"
    stamp = out.stat().st_mtime_ns
    again = scoring.run(cfg, out)  # complete: nothing is scored or written
    assert again["seconds"] == 0 and out.stat().st_mtime_ns == stamp
    assert again["score_mean"] == pytest.approx(first["score_mean"])
    fingerprint = lambda *extra: scoring.config_fingerprint(  # noqa: E731
        load_config("configs/demo.yaml", TINY + ["score.scorer=clarity", *extra])
    )
    assert fingerprint() == scoring.read_metadata(out)["config_sha256"]
    assert fingerprint("score.batch_size=5", "score.draws=9") == fingerprint()  # no effect
    assert fingerprint("data.seed=1") != fingerprint()


def test_rater_errors_name_what_is_missing(rating_run, tmp_path, capsys):
    workdir = rating_run[0]
    assert cli.main(["score", "--out", str(tmp_path / "r.parquet"), "--scorer", "rater"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pass --rater DIR" in err and len(err.splitlines()) == 1
    with pytest.raises(ValueError, match="--rater is read by score.scorer=rater only"):
        scoring.run(
            load_config(None, ["score.scorer=clarity"]), tmp_path / "c.parquet", rater_dir=workdir
        )
    data_cfg = load_config("configs/demo.yaml", TINY).data
    with pytest.raises(ValueError, match=f"{tmp_path} is not a rating run: it has no config"):
        scoring.open_rating_run(tmp_path, data_cfg)
    shutil.copy(workdir / "config.yaml", tmp_path / "config.yaml")
    with pytest.raises(ValueError, match=f"{tmp_path} has no rater checkpoint"):
        scoring.open_rating_run(tmp_path, data_cfg)
    other = load_config("configs/demo.yaml", TINY + ["data.max_text_length=20"]).data
    with pytest.raises(ValueError, match="data.max_text_length is 20 but the rater in .* with 16"):
        scoring.open_rating_run(workdir, other)


def test_loss_scorer_trains_its_proxy_on_the_validation_set(tmp_path):
    cfg = load_config(
        "configs/demo.yaml",
        TINY
        + [
            "score.scorer=loss",
            "score.proxy_steps=3",
            "score.draws=1",
            "score.batch_size=32",
            "train.batch_size=8",
        ],
    )
    out = tmp_path / "loss.parquet"
    summary = scoring.run(cfg, out)
    table = pq.read_table(out)
    assert table.num_rows == summary["count"] == 96
    scores = table.column("score").to_numpy()
    assert np.all(np.isfinite(scores)) and np.all(scores < 0) and scores.std() > 0
    assert not scoring.chunk_folder(out).exists()  # chunks and the proxy's workdir are gone
    assert scoring.read_metadata(out)["config_sha256"] == scoring.config_fingerprint(cfg)
    # The fingerprint follows the proxy's training config, not the other scorers' settings.
    changed = lambda *extra: scoring.config_fingerprint(  # noqa: E731
        load_config("configs/demo.yaml", TINY + ["score.scorer=loss", *extra])
    )
    assert changed("train.learning_rate=0.5") != changed() == changed("score.early_steps=7")


# ----------------------------------------------------------------------------------------------
# clip_score: the full caption
# ----------------------------------------------------------------------------------------------


def test_clip_score_scores_the_full_caption_not_the_pools_cut_tokens(tmp_path):
    """With data.max_text_length=4 the pool's token ids keep 2 words of each caption; CLIP must
    still see the whole caption, tokenized by its own tokenizer to its context length (77)."""
    from test_clip import (
        _cosine,
        reference_image_embeds,
        reference_pixels,
        reference_text_embeds,
        write_checkpoint,
    )

    from alchemist_jax.data import load_splits
    from alchemist_jax.data.tokenizer import Tokenizer
    from alchemist_jax.models import clip

    config, w = write_checkpoint(tmp_path / "clip")
    cfg = load_config(
        "configs/demo.yaml",
        TINY
        + [
            "data.max_text_length=4",
            "score.scorer=clip_score",
            f"score.clip_path={tmp_path / 'clip'}",
            "score.batch_size=40",  # 96 samples: the last batch is padded
        ],
    )
    out = tmp_path / "ratings.parquet"
    scoring.run(cfg, out)
    scores = pq.read_table(out).column("score").to_numpy()

    raw = load_splits(cfg.data).train
    captions = [raw[i]["caption"] for i in range(len(raw))]
    checkpoint = clip.load_clip(tmp_path / "clip")
    full = checkpoint.tokenize(captions)
    pool = prepare_splits(cfg.data).pool
    cut_text = Tokenizer(4).decode(pool.extra["tokens"], pool.extra["token_mask"])
    cut = checkpoint.tokenize(cut_text)
    # Every caption is longer than the pool's 2 text tokens (start and end take the other 2).
    assert np.all((full != full[:, -1:]).sum(1) > (cut != cut[:, -1:]).sum(1))

    images = np.stack([raw[i]["image"] for i in range(len(raw))]) / 255.0
    pixels = reference_pixels(images, 16, clip.OPENAI_IMAGE_MEAN, clip.OPENAI_IMAGE_STD)
    image_embeds = reference_image_embeds(w, config, pixels)
    expected = _cosine(image_embeds, reference_text_embeds(w, config, full))
    truncated = _cosine(image_embeds, reference_text_embeds(w, config, cut))
    # float32 towers against the float64 reference: ~1e-6 (tests/test_clip.py uses 1e-5).
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5)
    assert np.max(np.abs(truncated - expected)) > 1e-2  # the cut captions score differently
