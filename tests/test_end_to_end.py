"""The whole pipeline on a tiny configuration: every output exists and agrees with the others."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_rate import TINY as RATE_TINY

from alchemist_jax import cli, dedup, pipeline
from alchemist_jax.config import ARMS, ConfigError, load_config
from alchemist_jax.data import load_splits

TINY = [
    *RATE_TINY,
    "data.pool.test_size=32",
    "score.batch_size=16",
    "score.chunk_size=40",
    "train.steps=4",
    "train.batch_size=8",
    "train.warmup_steps=1",
    "train.eval_every=2",
    "train.checkpoint_every=2",
    "evaluate.classifier_steps=20",
    "evaluate.sample_steps=2",
    "evaluate.grid_captions=2",
    "evaluate.grid_samples=2",
    "pipeline.arms=[alchemist,meta_only,meta_alignment,alchemist_shift_gsample,release,topk,"
    "random,full,oracle]",
    "pipeline.seeds=[0]",
    "pipeline.budget=both",
    "pipeline.penalty_steps=2",
]


def test_pipeline_outputs_are_complete_and_consistent(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert (
        cli.main(["pipeline", "--config", "configs/demo.yaml", "--workdir", str(workdir), *TINY])
        == 0
    )
    cfg = load_config("configs/demo.yaml", TINY)
    splits = load_splits(cfg.data)
    pool_ids = set(splits.train.ids.tolist())
    clean_ids = {i for i, kind in zip(splits.train.ids.tolist(), splits.defects) if kind is None}

    for name in ("exact", "penalty", "alignment"):
        ratings = pq.read_table(workdir / "ratings" / f"{name}.parquet")
        assert ratings.schema.field("id").type == "int64"
        assert ratings.schema.field("score").type == "float"
        assert sorted(ratings.column("id").to_pylist()) == sorted(pool_ids)  # one row per id
        assert np.isfinite(ratings.column("score").to_numpy()).all()
        assert (workdir / "rate" / name / "metrics.jsonl").exists() == (name != "alignment")
    dedup_ids, duplicate_groups = dedup.read_groups(workdir / "dedup.parquet")
    assert sorted(dedup_ids.tolist()) == sorted(pool_ids)
    group_of = dict(zip(dedup_ids.tolist(), duplicate_groups.tolist()))

    sizes = {}
    for arm in cfg.pipeline.arms:
        ids = pq.read_table(workdir / "selections" / f"{arm}.parquet").column("id").to_pylist()
        summary = json.loads((workdir / "selections" / f"{arm}.json").read_text())
        assert len(set(ids)) == len(ids) == summary["count"]
        assert set(ids) <= pool_ids
        assert summary["arm"] == arm
        assert summary.get("ratings", []) == [
            f"ratings/{name}.parquet" for name in ARMS[arm].ratings
        ]
        assert summary.get("dedup") == ("dedup.parquet" if arm == "alchemist" else None)
        sizes[arm] = len(ids)
        if arm == "alchemist":  # at most one sample of each duplicate group
            assert len({group_of[i] for i in ids}) == len(ids)
    half = (
        "alchemist",
        "meta_only",
        "meta_alignment",
        "alchemist_shift_gsample",
        "release",
        "topk",
        "random",
    )
    assert {arm: sizes[arm] for arm in half} == dict.fromkeys(half, 48)
    assert sizes["full"] == 96
    assert (
        set(pq.read_table(workdir / "selections" / "oracle.parquet").column("id").to_pylist())
        == clean_ids
    )

    rows = json.loads((workdir / "results.json").read_text())
    # 9 arms at equal steps; at equal epochs the 50% arms reuse their runs, full and oracle
    # train for 96/48 and 67/48 times the steps.
    assert len(rows) == 18
    epochs = {row["arm"]: row for row in rows if row["budget"] == "epochs"}
    assert epochs["full"]["run"] == "full-epochs" and epochs["full"]["steps"] == 8
    assert epochs["oracle"]["steps"] == round(4 * len(clean_ids) / 48)
    assert epochs["alchemist"]["run"] == "alchemist" and epochs["alchemist"]["steps"] == 4
    for row in rows:
        assert row["train_size"] == sizes[row["arm"]]
        metrics = json.loads((workdir / "eval" / row["run"] / "seed0" / "metrics.json").read_text())
        assert row["test_loss"] == metrics["test_loss"] and np.isfinite(row["test_loss"])
        assert 0 <= row["alignment"] <= 1 and row["fcd"] >= 0
        assert (workdir / "eval" / row["run"] / "seed0" / "samples.png").exists()
        assert (workdir / "train" / row["run"] / "seed0" / "metrics.jsonl").exists()
    html = (workdir / "report" / "index.html").read_text()
    assert "AUROC" in html and "full-epochs" in html and 'id="components"' in html
    out = capsys.readouterr().out
    assert "report:" in out and "alchemist" in out

    # Rerunning finds every stage done and reproduces the same results.
    assert pipeline.run(cfg, workdir) == rows


def test_pipeline_config_errors(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"config key 'pipeline.arms\[1\]' must be one of "
        r"'alchemist', .*; got 'best'",
    ):
        load_config("configs/demo.yaml", TINY + ["pipeline.arms=[alchemist,best]"])
    cfg = load_config(
        "configs/demo.yaml", TINY + ["data.corrupt.fraction=0", "pipeline.arms=[oracle]"]
    )
    with pytest.raises(ConfigError, match="`oracle` needs injected defects"):
        pipeline.run(cfg, tmp_path / "other")
    with pytest.raises(
        ConfigError,
        match=r"select.weights has 3 values, but arm 'alchemist' "
        r"fuses 2 ratings \(exact, alignment\)",
    ):
        load_config("configs/demo.yaml", TINY + ["select.weights=[1.0, 2.0, 3.0]"])


def test_penalty_rater_runs_the_released_scheme_from_the_exact_raters_config():
    """The release arm's rater: mode penalty for pipeline.penalty_steps meta-steps, proxies from
    scratch (no warm start) and no mixed mode, whatever the exact rater uses."""
    cfg = load_config(
        "configs/demo.yaml",
        ["rate.warm_start_steps=2000", "rate.mixed_mode=true", "pipeline.penalty_steps=7"],
    )
    assert pipeline.rater_config(cfg, "exact") is cfg
    penalty = pipeline.rater_config(cfg, "penalty").rate
    assert (penalty.mode, penalty.steps, penalty.warm_start_steps) == ("penalty", 7, 0)
    assert not penalty.mixed_mode and penalty.checkpoint_every == 7
    assert penalty.inner_steps == cfg.rate.inner_steps and penalty.seed == cfg.rate.seed
