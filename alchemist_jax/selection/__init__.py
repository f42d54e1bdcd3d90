"""Choosing the training subset from ratings (`alchemist-jax select`).

    selected = select(scores, ids, policy="filter", keep=0.5, seed=0, groups=groups, drop=0.25)
    fused = fuse([meta_scores, alignment_scores], weights=[1.0, 1.0], groups=groups)
    eligible = best_of_duplicates(fused, ids, duplicate_groups)
    groups, names = cluster_groups(pool, "auto", clusters=20, seed=0)
    selected, summary = select_for_source(cfg.select, {"ratings.parquet": (ids, scores)}, pool)
    summary = run(cfg, [Path("meta.parquet"), Path("alignment.parquet")], Path("selection.parquet"),
                  dedup=Path("dedup.parquet"))

One job per module:

  policies  the selection policies (pure): `select`, `inclusion_probabilities`, `resolve_params`,
            `allocate`, `cdf_acceptance`; the policy dispatch keyed by `config.POLICIES`
  fusion    several scorers -> one fused score, label-free reliability weights
            (`reliability_weights`), collapse of duplicates, the summary (pure)
  ranking   how much of each cluster's score offset is style: `shrunk_offsets` (empirical
            Bayes, leave one out, capped), `robust_z` (pure)
  clusters  the ranking clusters of the pool (label / caption / k-means over normalised caption
            vectors with a minimum size; `tfidf`, `kmeans`); the dispatch keyed by
            `config.GROUPINGS`
  command   ratings and dedup files joined on the pool (`ranking_scores`, `select_for_source`,
            `inclusion_for_source`), `read_ratings`, `write_selection` and the command `run`

Ranks and within-group normalisation come from `runtime.stats`, file reading, id joins and
atomic writes from `runtime.io`. Every name other modules use is re-exported here.
"""

from alchemist_jax.runtime.stats import rank_normalize, rank_percentiles
from alchemist_jax.selection.clusters import cluster_groups, kmeans, resolve_grouping, tfidf
from alchemist_jax.selection.command import (
    PARQUET_METADATA_KEY,
    RECIPE_KEYS,
    RankingScores,
    inclusion_for_source,
    ranking_scores,
    read_ratings,
    run,
    select_for_source,
    write_selection,
)
from alchemist_jax.selection.fusion import (
    HISTOGRAM_BINS,
    best_of_duplicates,
    fuse,
    reliability,
    reliability_weights,
    summarize,
)
from alchemist_jax.selection.policies import (
    PARAMETER_DEFAULTS,
    POLICY_PARAMETERS,
    allocate,
    cdf_acceptance,
    inclusion_probabilities,
    resolve_params,
    select,
)
from alchemist_jax.selection.ranking import Offsets, robust_z, shrunk_offsets

__all__ = [
    "HISTOGRAM_BINS",
    "Offsets",
    "PARAMETER_DEFAULTS",
    "PARQUET_METADATA_KEY",
    "POLICY_PARAMETERS",
    "RECIPE_KEYS",
    "RankingScores",
    "allocate",
    "best_of_duplicates",
    "cdf_acceptance",
    "cluster_groups",
    "fuse",
    "inclusion_for_source",
    "inclusion_probabilities",
    "kmeans",
    "rank_normalize",
    "rank_percentiles",
    "ranking_scores",
    "read_ratings",
    "reliability",
    "reliability_weights",
    "resolve_grouping",
    "resolve_params",
    "robust_z",
    "run",
    "select",
    "select_for_source",
    "shrunk_offsets",
    "summarize",
    "tfidf",
    "write_selection",
]
