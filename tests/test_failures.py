"""Failure paths (docs/RELIABILITY.md): non-finite guards, preemption, data drift on resume,
reports that must not overwrite each other, one-line errors for user mistakes, logs fit for
clusters."""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_rate import TINY as RATE_TINY
from test_train import TINY as TRAIN_TINY

from alchemist_jax import alignment, cli, rating, scoring, training
from alchemist_jax.config import load_config
from alchemist_jax.data import prepare_splits
from alchemist_jax.data.sources import ArraySource
from alchemist_jax.dedup import features as dedup_features
from alchemist_jax.evaluation import classifier as classifier_lib
from alchemist_jax.runtime import checkpoints, io, numerics, preemption, progress, runlog

QUICK_RATE = RATE_TINY + ["rate.steps=3", "rate.checkpoint_every=1", "rate.max_bad_steps=2"]


def _manifest(folder: Path, name: str, ids: list[int], bad: int = 0, seed: int = 0) -> Path:
    """A Parquet manifest of 28x28 images with captions; the last `bad` rows name missing
    files."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in ids[: len(ids) - bad]:
        path = folder / f"{name}-{i}.png"
        Image.fromarray(rng.integers(0, 255, (28, 28, 3), np.uint8)).save(path)
        paths.append(path.name)
    paths += [f"missing-{i}.png" for i in ids[len(ids) - bad :]]
    table = pa.table({"id": ids, "image": paths, "caption": [f"a photo number {i}" for i in ids]})
    out = folder / f"{name}.parquet"
    pq.write_table(table, out)
    return out


def _manifest_overrides(pool: Path, validation: Path) -> list[str]:
    return [
        f"data.source={pool}",
        f"data.validation_source={validation}",
        "data.manifest.id_column=id",
        "data.channels=3",
        "data.corrupt.fraction=0",
    ]


# ----------------------------------------------------------------------------------------------
# Non-finite values
# ----------------------------------------------------------------------------------------------


def test_guard_helpers_skip_and_count():
    ok = numerics.all_finite({"a": jax.numpy.ones(3), "n": jax.numpy.arange(3)})
    assert bool(ok) and not bool(numerics.all_finite((1.0, np.array([np.nan]))))
    kept = numerics.keep_if(
        jax.numpy.asarray(False), {"x": jax.numpy.ones(2)}, {"x": jax.numpy.zeros(2)}
    )
    np.testing.assert_array_equal(kept["x"], [0.0, 0.0])
    guard = numerics.BadStepGuard("probe", 2, "lower probe.lr")
    assert guard.check(1, False, {"loss": float("nan")}) is False
    assert guard.check(2, True, {}) is True and guard.consecutive == 0
    guard.check(3, False, {"loss": float("inf")})
    with pytest.raises(
        numerics.NonFiniteError,
        match=r"probe stopped at step 4: 2 consecutive "
        r"steps .*loss=nan.*lower probe.lr",
    ):
        guard.check(4, False, {"loss": float("nan")})
    assert guard.skipped == 3


def test_rating_with_an_exploding_inner_lr_stops_and_keeps_no_bad_checkpoint(tmp_path):
    cfg = load_config("configs/demo.yaml", QUICK_RATE + ["rate.inner_lr=1e6"])
    with pytest.raises(numerics.NonFiniteError, match=r"lower rate.inner_lr \(1e\+06\)"):
        rating.run(cfg, tmp_path)
    if (tmp_path / "metrics.jsonl").exists():
        runlog.read_metrics(tmp_path / "metrics.jsonl")  # valid JSON lines
    step = checkpoints.latest_step(tmp_path / "checkpoints")
    if step is not None:  # whatever was saved is finite
        manager = checkpoints.manager(tmp_path / "checkpoints", read_only=True)
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))[
            "state"
        ]
        assert all(
            np.all(np.isfinite(np.asarray(x)))
            for x in jax.tree.leaves(restored)
            if np.issubdtype(np.asarray(x).dtype, np.floating)
        )


def test_checkpoint_of_a_non_finite_state_is_refused(tmp_path):
    manager = checkpoints.manager(tmp_path / "ck")
    checkpoints.save(manager, 1, {"w": np.ones(3, np.float32)}, {})
    with pytest.raises(numerics.NonFiniteError, match="not saving checkpoint 2 .* NaN or Inf"):
        checkpoints.save(manager, 2, {"w": np.array([1.0, np.nan], np.float32)}, {})
    assert manager.latest_step() == 1


def test_training_that_diverges_stops_with_the_cause(tmp_path):
    cfg = load_config(
        "configs/demo.yaml", TRAIN_TINY + ["train.learning_rate=1e6", "train.divergence_factor=10"]
    )
    data = prepare_splits(cfg.data)
    with pytest.raises(numerics.NonFiniteError, match=r"lower train.learning_rate \(1e\+06\)"):
        training.train_model(cfg, data.pool, tmp_path, steps=30, seed=0)


def test_contrastive_training_on_nan_images_stops_naming_the_data():
    n = 16
    tokens = np.tile(np.array([[1, 5, 2, 0]], np.int32), (n, 1))
    data = {
        "image": np.full((n, 8, 8, 1), np.nan, np.float32),
        "tokens": tokens,
        "token_mask": tokens > 0,
    }
    settings = alignment.ContrastiveTraining(
        steps=6, batch_size=8, width=4, dim=4, max_shift=1, max_bad_steps=3
    )
    with pytest.raises(
        numerics.NonFiniteError,
        match=r"contrastive stopped at step 3: 3 consecutive .*data.validation_source",
    ):
        alignment.train_contrastive(data, settings, seed=0)


def test_classifier_training_skips_non_finite_steps_then_stops():
    images = np.full((8, 8, 8, 1), np.inf, np.float32)
    with pytest.raises(
        numerics.NonFiniteError,
        match=r"feature classifier stopped at step 2: .*data.validation_source",
    ):
        classifier_lib.train_classifier(images, np.arange(8) % 2, 5, 0, max_bad_steps=2)


def _synthetic_pool(n: int) -> ArraySource:
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (n, 4, 4, 1)).astype(np.float32)
    return ArraySource("synthetic", np.arange(n) + 100, None, None, extra={"image": images})


SCORE_META = {"scorer": "probe", "config_sha256": "abc", "source": "synthetic", "count": "20"}


def test_scoring_refuses_non_finite_scores_unless_asked(tmp_path):
    pool = _synthetic_pool(20)

    def half_broken(batch):  # NaN for ids 105 and 117
        scores = batch["image"].mean(axis=(1, 2, 3))
        return np.where(np.isin(batch["id"], [105, 117]), np.nan, scores)

    out = tmp_path / "ratings.parquet"
    args = dict(batch_size=4, chunk_size=8, metadata=SCORE_META)
    with pytest.raises(
        ValueError,
        match=r"score.scorer=probe: 1 of 8 scores are NaN or Inf \(e.g. id 105\), not "
        r"writing .*00000.parquet.*score.allow_nonfinite=true",
    ):
        scoring.score_pool(half_broken, pool, out, **args)
    assert not out.exists() and not list(scoring.chunk_folder(out).glob("*.parquet"))
    scores = scoring.score_pool(half_broken, pool, out, allow_nonfinite=True, **args)
    assert int(np.sum(~np.isfinite(scores))) == 2 and out.exists()
    assert load_config("configs/demo.yaml", ["score.allow_nonfinite=true"]).score.allow_nonfinite


def test_a_signal_stops_scoring_at_a_chunk_boundary_and_the_rerun_resumes(tmp_path):
    pool = _synthetic_pool(20)
    args = dict(batch_size=4, chunk_size=8, metadata=SCORE_META)
    whole = tmp_path / "whole.parquet"
    scoring.score_pool(lambda b: b["image"].mean(axis=(1, 2, 3)), pool, whole, **args)
    calls = []

    def signalling(batch):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch["image"].mean(axis=(1, 2, 3))

    split = tmp_path / "split.parquet"
    with pytest.raises(preemption.Preempted, match="after chunk 1 of 3; finished chunks kept"):
        scoring.score_pool(signalling, pool, split, **args)
    assert [p.name for p in scoring.chunk_folder(split).glob("*.parquet")] == ["00000.parquet"]
    assert len(calls) == 2  # the chunk in progress finished (2 batches), no more
    scoring.score_pool(signalling, pool, split, **args)
    assert split.read_bytes() == whole.read_bytes()
    assert not scoring.chunk_folder(split).exists()


def test_a_signal_stops_dedup_at_the_next_batch():
    stop = preemption.StopRequest()
    pool = _synthetic_pool(8)
    cfg = load_config("configs/demo.yaml", ["dedup.batch_size=4"]).dedup
    assert len(dedup_features.fingerprints(pool, cfg, stop=stop)[0]) == 8
    stop.signal_name = "SIGTERM"
    with pytest.raises(preemption.Preempted, match="dedup stopped by SIGTERM during dedup"):
        dedup_features.fingerprints(pool, cfg, stop=stop)


def test_pipeline_takes_allow_data_change():
    args = cli.build_parser().parse_args(["pipeline", "--workdir", "x", "--allow-data-change"])
    assert args.allow_data_change


def test_metrics_log_writes_valid_json_for_non_finite_values(tmp_path):
    log = runlog.MetricsLog(tmp_path)
    log.write(1, {"loss": float("nan"), "ok": 2.0})
    log.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line) == {"step": 1, "loss": None, "ok": 2.0} and "NaN" not in line


# ----------------------------------------------------------------------------------------------
# Preemption
# ----------------------------------------------------------------------------------------------


def _signal_after(count: int, sig: int, monkeypatch, loop: str = "rate") -> None:
    """Makes the progress bar of the loop `loop` (its label's start) send `sig` to this process
    after `count` steps."""
    real = progress.bar

    def bar(iterable=None, **kwargs):
        if not kwargs.get("desc", "").startswith(loop):
            return real(iterable, **kwargs)

        def steps():
            for number, item in enumerate(iterable):
                yield item
                if number + 1 == count:
                    os.kill(os.getpid(), sig)

        return real(steps(), **{k: v for k, v in kwargs.items() if k != "total"})

    monkeypatch.setattr(progress, "bar", bar)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_and_the_rerun_resumes_exactly(tmp_path, monkeypatch, sig):
    cfg = load_config("configs/demo.yaml", RATE_TINY + ["rate.checkpoint_every=4"])
    full = rating.run(cfg, tmp_path / "full")
    _signal_after(1, sig, monkeypatch)
    # The signal arrives as meta-step 2 begins: that step finishes, then the run stops.
    with pytest.raises(
        preemption.Preempted,
        match=f"rate stopped by {signal.Signals(sig).name} after meta-step 2 of 4",
    ):
        rating.run(cfg, tmp_path / "split")
    assert checkpoints.latest_step(tmp_path / "split" / "checkpoints") == 2
    assert signal.getsignal(sig) is not None  # the guard restored the handler
    monkeypatch.undo()
    assert rating.run(cfg, tmp_path / "split") == pytest.approx(full, rel=1e-6)
    steps = [row["step"] for row in runlog.read_metrics(tmp_path / "split" / "metrics.jsonl")]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4]


def test_sigterm_to_the_command_exits_75_with_one_line(tmp_path):
    """The real thing: `alchemist-jax train` in a subprocess, SIGTERM once it is stepping."""
    workdir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "alchemist_jax.cli",
        "train",
        "--config",
        "configs/demo.yaml",
        "--workdir",
        str(workdir),
        *TRAIN_TINY,
        "train.steps=100000",
        "train.checkpoint_every=100000",
    ]
    env = {**os.environ, "ALCHEMIST_PROGRESS_SECONDS": "0"}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "train:" in line and "step" in line:  # a progress line: the loop is running
            process.send_signal(signal.SIGTERM)
            break
    rest = process.communicate(timeout=300)[1]
    assert process.returncode == preemption.EXIT_PREEMPTED, "".join(lines) + rest
    final = rest.strip().splitlines()[-1]
    assert final.startswith("alchemist-jax train: train stopped by SIGTERM after step ")
    assert checkpoints.latest_step(workdir / "checkpoints") is not None


# ----------------------------------------------------------------------------------------------
# Data drift, reports, user mistakes
# ----------------------------------------------------------------------------------------------


def test_a_partial_metrics_line_left_by_a_kill_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    runlog.forget_after(path, 2)
    assert [row["step"] for row in runlog.read_metrics(path)] == [1, 2]


def test_resume_on_changed_data_is_refused_unless_allowed(tmp_path):
    pool = _manifest(tmp_path / "data", "pool", list(range(32)))
    validation = _manifest(tmp_path / "data", "val", list(range(100, 116)), seed=1)
    cfg = load_config("configs/demo.yaml", QUICK_RATE + _manifest_overrides(pool, validation))
    rating.run(cfg, tmp_path / "run", stop_after=1)
    _manifest(tmp_path / "data", "pool", list(range(32)), seed=7)  # same ids, other images
    with pytest.raises(
        ValueError,
        match=r"holds a run on other data: the pool rows differ .* "
        r"--allow-data-change",
    ):
        rating.run(cfg, tmp_path / "run")
    assert "meta_loss" in rating.run(cfg, tmp_path / "run", allow_data_change=True)


def test_pool_and_validation_reports_do_not_overwrite_each_other(tmp_path):
    pool = _manifest(tmp_path / "data", "pool", list(range(10)), bad=2)
    validation = _manifest(tmp_path / "data", "val", list(range(100, 108)), bad=1, seed=1)
    cfg = load_config("configs/demo.yaml", _manifest_overrides(pool, validation))
    prepare_splits(cfg.data, report_dir=tmp_path / "run")
    assert pq.read_table(tmp_path / "run" / "bad_samples.parquet").num_rows == 2
    assert pq.read_table(tmp_path / "run" / "validation" / "bad_samples.parquet").num_rows == 1


def test_an_all_bad_manifest_is_one_line(tmp_path, capsys):
    pool = _manifest(tmp_path / "data", "pool", list(range(4)), bad=4)
    validation = _manifest(tmp_path / "data", "val", list(range(100, 108)), seed=1)
    code = cli.main(
        [
            "rate",
            "--config",
            "configs/demo.yaml",
            "--workdir",
            str(tmp_path / "r"),
            *QUICK_RATE,
            *_manifest_overrides(pool, validation),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "no usable samples: all 4 rows are bad samples" in err[0]


def test_a_failed_first_run_does_not_bind_its_config(tmp_path):
    bad = load_config("configs/demo.yaml", QUICK_RATE + ["data.batch_size=9999"])
    with pytest.raises(ValueError):
        rating.run(bad, tmp_path)  # fails before its first checkpoint
    good = load_config("configs/demo.yaml", QUICK_RATE + ["rate.steps=1"])
    assert "meta_loss" in rating.run(good, tmp_path)


def test_disk_full_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_text("old")

    def full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError, match=f"cannot write {target}: No space left on device"):
        io.atomic_write_json(target, {"new": 1})
    monkeypatch.undo()
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "out.json"
    ]


def test_disk_full_during_a_checkpoint_keeps_the_last_one(tmp_path, monkeypatch):
    manager = checkpoints.manager(tmp_path / "ck")
    checkpoints.save(manager, 1, {"w": np.ones(3, np.float32)}, {})

    def full(step, args=None):  # orbax got as far as its temporary folder
        (tmp_path / "ck" / f"{step}.orbax-checkpoint-tmp-1").mkdir()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(manager, "save", full)
    with pytest.raises(OSError, match=r"cannot write checkpoint 2 in .*ck: No space left"):
        checkpoints.save(manager, 2, {"w": np.zeros(3, np.float32)}, {})
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["1"]
    assert checkpoints.latest_step(tmp_path / "ck") == 1


def test_dedup_ranges_come_from_the_config(tmp_path):
    from alchemist_jax import dedup
    from alchemist_jax.config import ConfigError, DedupConfig

    with pytest.raises(ConfigError, match="config key 'dedup.window' must be >= 1, got 0"):
        dedup.check_config(DedupConfig(window=0))
    dedup.check_config(DedupConfig())


def test_silent_hold_out_is_announced(tmp_path, caplog):
    pool = _manifest(tmp_path / "data", "pool", list(range(24)))
    cfg = load_config(
        "configs/demo.yaml",
        [
            f"data.source={pool}",
            "data.manifest.id_column=id",
            "data.channels=3",
            "data.corrupt.fraction=0",
        ],
    )
    with caplog.at_level(logging.WARNING, logger="alchemist_jax"):
        splits = prepare_splits(cfg.data)
    assert len(splits.pool) == 22
    assert any(
        "2 of its 24 samples" in r.message and "data.validation_source" in r.message
        for r in caplog.records
    )


# ----------------------------------------------------------------------------------------------
# Logs fit for clusters
# ----------------------------------------------------------------------------------------------


def test_progress_off_a_terminal_is_periodic_lines(monkeypatch, caplog):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    monkeypatch.setenv("ALCHEMIST_PROGRESS_SECONDS", "0")
    with caplog.at_level(logging.INFO, logger="alchemist_jax"):
        items = list(progress.bar(range(3), desc="probe", unit="step"))
    assert items == [0, 1, 2]
    lines = [r.message for r in caplog.records if r.message.startswith("probe:")]
    assert lines[-1].startswith("probe: 3/3 step") and not any("\r" in m for m in lines)


def test_backend_chatter_is_below_the_log_level(monkeypatch):
    root, ours = logging.getLogger(), logging.getLogger("alchemist_jax")
    monkeypatch.setattr(root, "level", root.level)  # restored after the test
    monkeypatch.setattr(ours, "level", ours.level)
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    cli._configure_logging()
    assert logging.getLogger("jax._src.xla_bridge").getEffectiveLevel() >= logging.WARNING
    assert logging.getLogger("alchemist_jax.rating").getEffectiveLevel() == logging.INFO
