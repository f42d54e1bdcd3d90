"""The whole pipeline (`alchemist-jax pipeline`, `./tools/demo.sh`), stage by stage:

  rate      learn each rater the arms need: `exact` (cfg.rate as configured) and, for the
            paper-faithful `release` arm, `penalty` (the released first-order scheme)
  score     one score per pool id from each rater's EMA parameters, and from each other scorer
            the arms fuse (`alignment`) -> ratings/<name>.parquet
  dedup     duplicate groups of the pool, for the arms that collapse them -> dedup.parquet
  select    each arm's subset of the pool, its ratings fused and its duplicates collapsed when
            it has several / a dedup file -> selections/<arm>.parquet (+ .json summary)
  train     a fresh T2I model per arm and seed -> train/<run>/seed<S>/ (equal steps; with
            pipeline.budget epochs|both also equal epochs for arms of another size: <arm>-epochs)
  evaluate  test loss, FCD, text alignment and a sample grid -> eval/<run>/seed<S>/
  report    results.json, report/index.html; the final table is printed

Every stage skips the work already on disk (each writes its outputs atomically, the rating and
training runs resume from their checkpoints), so rerunning the same command after an interruption
continues where it stopped. The run folder layout is documented in docs/PIPELINE.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from alchemist_jax import config as config_lib
from alchemist_jax import dedup, rating, report, scoring, selection, training
from alchemist_jax.config import ARMS, RATERS, Arm
from alchemist_jax.data import load_splits, preprocess
from alchemist_jax.evaluation import classifier as classifier_lib
from alchemist_jax.evaluation import generative
from alchemist_jax.runtime.io import atomic_write_bytes

log = logging.getLogger("alchemist_jax.pipeline")


# A rerun must agree on these sections (the pipeline section may change: more seeds or arms).
RESULT_SECTIONS = (
    "data",
    "model",
    "rater",
    "rate",
    "score",
    "dedup",
    "select",
    "train",
    "evaluate",
)


def rater_config(cfg: config_lib.Config, rater: str) -> config_lib.Config:
    """The config of rater `exact` (cfg as given) or `penalty` (mode penalty, with
    pipeline.penalty_steps meta-steps when set; `rate.mixed_mode`, a custom VJP of the unrolled
    mode's inner steps, off: the penalty scheme differentiates no inner step; no
    `rate.warm_start_steps`: the released scheme starts its proxies from scratch)."""
    if rater == "exact":
        return cfg
    steps = cfg.pipeline.penalty_steps or cfg.rate.steps
    return dataclasses.replace(
        cfg,
        rate=dataclasses.replace(
            cfg.rate,
            mode="penalty",
            mixed_mode=False,
            warm_start_steps=0,
            steps=steps,
            checkpoint_every=min(cfg.rate.checkpoint_every, steps),
        ),
    )


def check_arms(cfg: config_lib.Config, has_defects: bool) -> None:
    """The one check that needs the data: the oracle arm knows the clean samples only when
    defects were injected (the config's own checks ran at load time, `config.validate`)."""
    if "oracle" in cfg.pipeline.arms and not has_defects:
        raise config_lib.ConfigError(
            "pipeline.arms: `oracle` needs injected defects "
            "(data.corrupt.fraction > 0) to know the clean samples"
        )


def run(cfg: config_lib.Config, workdir: str | Path, allow_data_change: bool = False) -> list[dict]:
    """Runs (or resumes) every stage in `workdir`; returns the rows of results.json.

    Args:
      cfg: the whole configuration.
      workdir: the run folder (layout: docs/PIPELINE.md).
      allow_data_change: let the rating and training runs resume on data other than their
        checkpoints' (otherwise refused, naming the run).
    Raises:
      preemption.Preempted: SIGTERM / SIGINT stopped a stage at its next step, chunk or batch
        boundary (its progress saved where it has any): rerunning the command resumes.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    splits = load_splits(cfg.data, report_dir=workdir)
    check_arms(cfg, splits.truth is not None)
    config_lib.write_run_config(cfg, workdir, RESULT_SECTIONS)
    arms = {name: ARMS[name] for name in cfg.pipeline.arms}

    needed = {name for arm in arms.values() for name in arm.ratings}
    for rater in (r for r in RATERS if r in needed):
        _stage(f"rate ({rater})")
        rating.run(
            rater_config(cfg, rater), workdir / "rate" / rater, allow_data_change=allow_data_change
        )
        _score(cfg, rater, "rater", workdir, rater_dir=workdir / "rate" / rater)
    for scorer in sorted(needed - set(RATERS)):
        _score(cfg, scorer, scorer, workdir)
    if any(arm.dedup for arm in arms.values()) and not (workdir / "dedup.parquet").exists():
        _stage("dedup")
        dedup.run(cfg, workdir / "dedup.parquet")

    _stage("select")
    pool_ids = splits.train.ids
    subsets = {name: _select(cfg, name, arm, splits, workdir) for name, arm in arms.items()}

    transform = preprocess.Preprocessor.for_config(cfg.data)
    pool = preprocess.materialize(splits.train, transform)
    validation = preprocess.materialize(splits.validation, transform)
    test = classifier_lib.load_test_data(cfg)
    classifier, classifier_missing = generative.try_feature_classifier(cfg, test)
    index_of = {int(i): n for n, i in enumerate(pool_ids)}

    rows = []
    budget_size = round(cfg.pipeline.keep * len(pool_ids))
    for seed in cfg.pipeline.seeds:
        for name, ids in subsets.items():
            for budget in _budgets(cfg.pipeline.budget):
                steps = cfg.train.steps
                if budget == "epochs":
                    steps = max(1, round(cfg.train.steps * len(ids) / budget_size))
                run_name = name if steps == cfg.train.steps else f"{name}-epochs"
                _stage(f"train {run_name} seed {seed} ({len(ids)} samples, {steps} steps)")
                train_dir = workdir / "train" / run_name / f"seed{seed}"
                train_cfg = dataclasses.replace(
                    cfg, train=dataclasses.replace(cfg.train, steps=steps, seed=seed)
                )
                trained = training.train_model(
                    train_cfg,
                    pool.take(np.array([index_of[int(i)] for i in ids])),
                    train_dir,
                    steps=steps,
                    seed=seed,
                    validation=validation,
                    desc=f"train {run_name}",
                    allow_data_change=allow_data_change,
                )
                eval_dir = workdir / "eval" / run_name / f"seed{seed}"
                metrics_path = eval_dir / "metrics.json"
                if metrics_path.exists():
                    metrics = json.loads(metrics_path.read_text())
                else:
                    metrics = generative.evaluate_model(
                        cfg,
                        trained,
                        test,
                        classifier,
                        eval_dir,
                        classifier_missing=classifier_missing,
                    )
                rows.append(
                    {
                        "arm": name,
                        "run": run_name,
                        "budget": budget,
                        "seed": seed,
                        "steps": steps,
                        "train_size": len(ids),
                        **{k: metrics.get(k) for k in ("test_loss", "fcd", "alignment")},
                    }
                )

    atomic_write_bytes(workdir / "results.json", json.dumps(rows, indent=1).encode())
    _stage("report")
    path = report.build(workdir)
    print(report.results_table_markdown(rows))
    print(f"\nreport: {path}  ({(time.perf_counter() - started) / 60:.1f} min)")
    return rows


def _budgets(budget: str) -> tuple[str, ...]:
    return ("steps", "epochs") if budget == "both" else (budget,)


def _stage(name: str) -> None:
    log.info("== %s", name)


def _score(
    cfg: config_lib.Config, name: str, scorer: str, workdir: Path, rater_dir: Path | None = None
) -> None:
    """Writes ratings/<name>.parquet with score.scorer=`scorer`, unless it is there."""
    ratings = workdir / "ratings" / f"{name}.parquet"
    if not ratings.exists():
        _stage(f"score ({name})")
        scoring.run(
            dataclasses.replace(cfg, score=dataclasses.replace(cfg.score, scorer=scorer)),
            ratings,
            rater_dir=rater_dir,
        )


def _select(cfg: config_lib.Config, name: str, arm: Arm, splits, workdir: Path) -> np.ndarray:
    """The ids arm `name` trains on (read back from selections/<name>.parquet when present)."""
    out = workdir / "selections" / f"{name}.parquet"
    if out.exists() and out.with_suffix(".json").exists():  # both written: the arm is done
        return pq.read_table(out).column("id").to_numpy()
    pool_ids = splits.train.ids
    if arm.policy is None:  # a fixed subset: the whole pool, or its clean samples
        keep = np.ones(len(pool_ids), bool)
        if arm.clean_only:
            keep = np.array([kind is None for kind in splits.defects])
        selected = np.sort(pool_ids[keep])
        summary = {
            "count": len(selected),
            "pool_size": len(pool_ids),
            "policy": "clean samples" if arm.clean_only else "whole pool",
        }
    else:
        # Files are named relative to the run folder, in the summaries and the report.
        ratings = {
            f"ratings/{rating}.parquet": selection.read_ratings(
                workdir / "ratings" / f"{rating}.parquet"
            )
            for rating in arm.ratings
        }
        duplicates = (
            ("dedup.parquet", dedup.read_groups(workdir / "dedup.parquet")) if arm.dedup else None
        )
        select_cfg = dataclasses.replace(
            cfg.select,
            policy=arm.policy,
            keep=cfg.pipeline.keep,
            weights=cfg.select.weights if len(arm.ratings) > 1 else (),
        )
        selected, summary = selection.select_for_source(
            select_cfg, ratings, splits.train, duplicates=duplicates
        )
        if not arm.ratings:
            summary.pop("rank_histogram", None)  # ranks of constant scores mean nothing
    selection.write_selection(out, selected, {"arm": name, **summary})
    log.info("%s: kept %d of %d", name, len(selected), len(pool_ids))
    return selected
