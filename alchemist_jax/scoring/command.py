"""`alchemist-jax score`: the scorer dispatch, the ratings metadata and the command `run`.

Ratings metadata (Parquet schema key/values, all strings): `scorer`, `config_sha256`
(`runtime.io.fingerprint` of the config parts the scores depend on, `config_fingerprint`),
`source` (the pool's name), `count`, and for the rater scorer `rater_checkpoint` (the rating
run's checkpoint folder) and `rater_step`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from alchemist_jax import config as config_lib
from alchemist_jax.data import load_splits, preprocess
from alchemist_jax.data.sources import ArraySource
from alchemist_jax.runtime import io, parallel
from alchemist_jax.scoring.driver import ScoreBatch, chunk_folder, finished_scores, score_pool
from alchemist_jax.scoring.heuristics import HEURISTICS
from alchemist_jax.scoring.proxy import ScoringInputs, alignment_scorer, clip_scorer, proxy_scorer
from alchemist_jax.scoring.rating_run import RatingRun, open_rating_run, rater_scorer


def heuristic_scorer(name: str) -> Callable[[ScoringInputs], ScoreBatch]:
    """The factory of heuristic scorer `name` (`config.HEURISTIC_SCORERS`)."""

    def factory(inputs: ScoringInputs) -> ScoreBatch:
        if "image" not in inputs.pool[0]:
            raise ValueError(
                f"score.scorer={name} needs pixel images; the pool "
                f"{inputs.pool.name} has none (precomputed latents)"
            )
        # Rows split over this process's devices, in and out (`driver.score_pool`).
        rows = parallel.local_rows_sharding()
        score = jax.jit(HEURISTICS[name], in_shardings=rows, out_shardings=rows)
        return lambda batch: score(batch["image"])

    return factory


# The scorer dispatch: one factory per name of `config.SCORERS` (the config is the one list of
# names; tests/test_scoring.py checks that this covers it exactly).
SCORERS: dict[str, Callable[[ScoringInputs], ScoreBatch]] = {
    "rater": lambda inputs: rater_scorer(inputs.rating_run, inputs.pool[0]),
    **{kind: proxy_scorer(kind) for kind in config_lib.PROXY_SCORERS},
    **{name: heuristic_scorer(name) for name in config_lib.HEURISTIC_SCORERS},
    "clip_score": clip_scorer,
    "alignment": alignment_scorer,
}

# score.* fields each scorer's result depends on (batch and chunk sizes never change a score).
_SCORE_FIELDS = {
    "loss": ("proxy_steps", "draws", "seed"),
    "el2n": ("early_steps", "draws", "seed"),
    "grand": ("early_steps", "draws", "seed"),
    "clip_score": ("clip_path",),
    "alignment": ("alignment_method", "alignment_references", "seed"),
}
# Scorers whose pass runs on several processes (`driver.score_pool`): their parameters, if
# any, are read by every process onto its own devices.
_MULTI_PROCESS_SCORERS = ("rater", *config_lib.HEURISTIC_SCORERS)
# data.* fields that change how the pool is read, never what is read (left out of the
# fingerprint: a pass streamed with threads writes the file an in-memory one writes).
_DATA_ACCESS_FIELDS = ("read_threads", "in_memory_limit")
# ... and those of each alignment method.
_ALIGNMENT_FIELDS = {
    "contrastive": ("alignment_steps",),
    "diffusion": ("proxy_steps", "draws", "alignment_t_min"),
}


def _trains_a_proxy(score_cfg: config_lib.ScoreConfig) -> bool:
    """Whether the scores come from a DiT trained by `proxy._train_proxy` (they depend on the
    config's `model` and `train` sections)."""
    return score_cfg.scorer in config_lib.PROXY_SCORERS or (
        score_cfg.scorer == "alignment" and score_cfg.alignment_method == "diffusion"
    )


def config_fingerprint(cfg: config_lib.Config, rating_run: RatingRun | None = None) -> str:
    """`io.fingerprint` of the config the scores depend on: `data` (but how it is read), the
    scorer and its `score.*` fields; `model` and `train` for the scorers with a proxy DiT; the
    rating run's `rater` and `rate` sections for the rater."""
    scorer = cfg.score.scorer
    fields = _SCORE_FIELDS.get(scorer, ())
    if scorer == "alignment":
        fields += _ALIGNMENT_FIELDS[cfg.score.alignment_method]
    data = config_lib.to_dict(cfg.data)
    for key in _DATA_ACCESS_FIELDS:
        data.pop(key)
    parts: dict[str, Any] = {
        "data": data,
        "score": {key: getattr(cfg.score, key) for key in ("scorer", *fields)},
    }
    if _trains_a_proxy(cfg.score):
        parts.update(model=config_lib.to_dict(cfg.model), train=config_lib.to_dict(cfg.train))
    if rating_run is not None:
        parts.update(
            rater=config_lib.to_dict(rating_run.config.rater),
            rate=config_lib.to_dict(rating_run.config.rate),
        )
    return io.fingerprint(parts)


def ratings_metadata(
    cfg: config_lib.Config, pool: ArraySource, rating_run: RatingRun | None = None
) -> dict[str, str]:
    """The metadata of a ratings file (see the module docstring)."""
    metadata = {
        "scorer": cfg.score.scorer,
        "config_sha256": config_fingerprint(cfg, rating_run),
        "source": pool.name,
        "count": str(len(pool)),
    }
    if rating_run is not None:
        metadata.update(
            rater_checkpoint=str(rating_run.checkpoints), rater_step=str(rating_run.step)
        )
    return metadata


def run(cfg: config_lib.Config, out: Path, rater_dir: Path | None = None) -> dict[str, Any]:
    """`alchemist-jax score`: scores the pool of `cfg.data` with `cfg.score.scorer` into `out`.

    Rerunning the same command resumes an interrupted pass (finished chunks are kept) and does
    nothing once `out` is complete. The rater scorer reads the rating run in `rater_dir` (its
    own config gives the rater's shapes); the proxy scorers train their proxy first (in the
    chunk folder, so an interrupted pass resumes that too).

    Returns:
      {"scorer", "count", "path", "seconds" (of this call's scoring pass; 0 when `out` was
      already complete), "samples_per_s" (count / seconds, None when nothing was scored),
      "score_mean", "score_std"}.
    """
    out = Path(out)
    scorer = cfg.score.scorer
    if scorer == "rater" and rater_dir is None:
        raise ValueError(
            "score.scorer=rater needs the rating run: pass --rater DIR (the "
            "--workdir of `alchemist-jax rate`)"
        )
    if scorer != "rater" and rater_dir is not None:
        raise ValueError(f"--rater is read by score.scorer=rater only, not by {scorer}")
    if jax.process_count() > 1 and scorer not in _MULTI_PROCESS_SCORERS:
        raise ValueError(
            f"score.scorer={scorer} runs in one process only (its model is trained or loaded "
            "per run, not per process); on several processes use one of "
            + ", ".join(_MULTI_PROCESS_SCORERS)
        )
    rating_run = open_rating_run(rater_dir, cfg.data) if scorer == "rater" else None
    splits = load_splits(cfg.data)
    transform = preprocess.Preprocessor.for_config(cfg.data)
    pool = preprocess.prepared(splits.train, transform, cfg.data.in_memory_limit)
    metadata = ratings_metadata(cfg, pool, rating_run)
    seconds = 0.0
    scores = finished_scores(out, pool.ids, metadata)
    if scores is None:
        validation = (
            preprocess.prepared(splits.validation, transform, cfg.data.in_memory_limit)
            if scorer in ("loss", "alignment")
            else None
        )
        # The proxy trains inside the chunk folder: resumed with it, removed with it.
        proxy_workdir = chunk_folder(out) / f"proxy-{metadata['config_sha256'][:16]}"
        score_batch = SCORERS[scorer](
            ScoringInputs(cfg, pool, validation, rating_run, proxy_workdir)
        )
        start = time.perf_counter()
        scores = score_pool(
            score_batch,
            pool,
            out,
            batch_size=cfg.score.batch_size,
            chunk_size=cfg.score.chunk_size,
            metadata=metadata,
            desc=f"score ({scorer})",
            allow_nonfinite=cfg.score.allow_nonfinite,
        )
        seconds = time.perf_counter() - start
    return {
        "scorer": scorer,
        "count": len(scores),
        "path": str(out),
        "seconds": round(seconds, 3),
        "samples_per_s": round(len(scores) / seconds, 1) if seconds else None,
        "score_mean": float(np.mean(scores)),
        "score_std": float(np.std(scores)),
    }
