"""The scoring pass (`alchemist-jax score`): one score per sample id of the pool, higher = better.

  driver      `score_pool`: the pool in chunks of fixed-shape batches, each chunk written
              atomically and skipped by a rerun, joined into the ratings file (id int64,
              score float32, pool order, the run's metadata in the Parquet schema)
  heuristics  clarity, edge_density, low_frequency: pure jitted functions of the images
  proxy       scorers from a trained model: loss, el2n, grand (proxy DiTs), clip_score,
              alignment; `ScoringInputs`, what a scorer factory may need
  rating_run  the rater scorer: a rating run's EMA rater read from its checkpoint
  command     `SCORERS` (one factory per name of `config.SCORERS`), `config_fingerprint`,
              `ratings_metadata` and `run(cfg, out, rater_dir)`: load + preprocess the splits,
              build the scorer, score

Modules import in that order (driver at the bottom, command at the top); the names other
modules use are re-exported here (`scoring.run`, `scoring.score_pool`, ...).
"""

from alchemist_jax.runtime.io import read_metadata
from alchemist_jax.scoring.command import (
    SCORERS,
    config_fingerprint,
    heuristic_scorer,
    ratings_metadata,
    run,
)
from alchemist_jax.scoring.driver import (
    ScoreBatch,
    chunk_folder,
    finished_scores,
    pool_columns,
    ratings_table,
    score_pool,
)
from alchemist_jax.scoring.heuristics import (
    EDGE_THRESHOLD,
    HEURISTICS,
    LOW_FREQUENCY_RADIUS,
    clarity,
    edge_density,
    low_frequency_energy,
)
from alchemist_jax.scoring.proxy import (
    ScoringInputs,
    alignment_scorer,
    clip_scorer,
    proxy_score_fn,
    proxy_scorer,
)
from alchemist_jax.scoring.rating_run import (
    RATER_DATA_KEYS,
    RatingRun,
    ema_rater,
    open_rating_run,
    rater_scorer,
    restore_rater,
)

__all__ = [
    "EDGE_THRESHOLD",
    "HEURISTICS",
    "LOW_FREQUENCY_RADIUS",
    "RATER_DATA_KEYS",
    "SCORERS",
    "RatingRun",
    "ScoreBatch",
    "ScoringInputs",
    "alignment_scorer",
    "chunk_folder",
    "clarity",
    "clip_scorer",
    "config_fingerprint",
    "edge_density",
    "ema_rater",
    "finished_scores",
    "heuristic_scorer",
    "low_frequency_energy",
    "open_rating_run",
    "pool_columns",
    "proxy_score_fn",
    "proxy_scorer",
    "rater_scorer",
    "ratings_metadata",
    "ratings_table",
    "read_metadata",
    "restore_rater",
    "run",
    "score_pool",
]
