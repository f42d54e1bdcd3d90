"""The `select` command: join ratings (and dedup) files on the pool, select, write the result.

    selected, summary = select_for_source(cfg.select, {"ratings.parquet": (ids, scores)}, pool)
    summary = run(cfg, [Path("meta.parquet"), Path("alignment.parquet")], Path("selection.parquet"),
                  dedup=Path("dedup.parquet"))

How clusters enter (`select.ranking`, see `ranking`): `shrunk` (default) removes each cluster's
style offset from every file's scores (robust z-scores, empirical-Bayes shrinkage) and the policy
ranks the whole pool once; `within` ranks inside each cluster and shares the budget among the
clusters in proportion to their eligible members (the duplicates collapsed by
`fusion.best_of_duplicates` are not); `global` ranks the raw scores of the whole pool. With one
ratings file the policy ranks that file's (adjusted) scores; with several it ranks their fused
score (`fusion.fuse`) with the weights of `select.weights`, or when those are empty the
reliability weights (`fusion.reliability_weights`, `select.fusion=reliability`) or equal ones.
The budget is always round(keep * N) of the whole pool.

When each ranking wins: `within` when the clusters are true classes of similar quality and a
scorer carries large per-class offsets that are not quality (the built-in pool's meta rater);
`global` when the clusters are arbitrary and the scorers' offsets are quality (free-text web
data); `shrunk` takes offsets out only as far as they look like style, so it follows `within` on
large clusters with typical offsets and `global` on small clusters and outlying ones (a cluster
of junk captions), and is measured within 0.01 of the better of the two on both kinds of pool
(docs/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from alchemist_jax.config import Config, SelectConfig
from alchemist_jax.data.sources import Source
from alchemist_jax.runtime.io import (
    atomic_write_json,
    atomic_write_parquet,
    pool_positions,
    read_parquet,
)
from alchemist_jax.selection.clusters import resolve_grouping
from alchemist_jax.selection.fusion import (
    best_of_duplicates,
    fuse,
    reliability_weights,
    summarize,
)
from alchemist_jax.selection.policies import (
    POLICY_PARAMETERS,
    check_finite,
    inclusion_probabilities,
    resolve_params,
    select,
)
from alchemist_jax.selection.ranking import Offsets, robust_z, shrunk_offsets

PARQUET_METADATA_KEY = b"alchemist_jax.selection"
# The summary keys a selection file records in its metadata: how it was made and from what.
RECIPE_KEYS = (
    "policy",
    "keep",
    "group_by",
    "kmeans",
    "ranking",
    "params",
    "ratings",
    "weights",
    "dedup",
)
CLUSTER_EXAMPLES = 3  # members shown per cluster in the summary (best, middle, worst)
MAX_SUMMARY_CLUSTERS = 200  # the largest clusters described in the summary


@dataclasses.dataclass(frozen=True)
class RankingScores:
    """What a selection from the pool ranks, one entry per pool sample, in pool order.

    ids: int64 (N,) the pool's ids.
    scores: float64 (N,) higher = better: the ratings file's own scores when there is one file,
      the fused score (`fuse`) when there are several, zeros when there is none.
    eligible: bool (N,) False for the duplicates collapsed into a better member of their group.
    groups: int64 (N,) ranking cluster; names: the cluster names; grouping: the `group_by`
      used (`auto` resolved).
    ratings, weights, dedup: the inputs: ratings names (files), the weight of each (given, or
      the reliability weights), the dedup name or None.
    ranking: `select.ranking`; policy_groups: the groups the policy ranks within (`groups` for
      `within`, None — one ranking — otherwise).
    reliability: per file, `fusion.reliability` of its offset-free scores (several files, no
      given weights) or None; offsets: per file, the `ranking.Offsets` of its robust z-scores.
    """

    ids: np.ndarray
    scores: np.ndarray
    eligible: np.ndarray
    groups: np.ndarray
    names: list[str]
    grouping: str
    ratings: list[str]
    weights: list[float]
    dedup: str | None
    ranking: str = "within"
    policy_groups: np.ndarray | None = None
    reliability: list[float] | None = None
    offsets: list[Offsets] = dataclasses.field(default_factory=list)


def ranking_scores(
    config: SelectConfig,
    ratings: Mapping[str, tuple[np.ndarray, np.ndarray]],
    source: Source,
    *,
    duplicates: tuple[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> RankingScores:
    """Joins ratings files (and a dedup file) on the pool's ids and fuses them (see the module
    docstring).

    Args:
      config: the `select` section (group_by, clusters, seed, weights).
      ratings: name (the file; errors and the record use it) -> (ids int64 (N,), scores float
        (N,)), each covering the pool's ids exactly once, in any order; empty: constant scores
        (for policies that read none, such as `random`).
      source: the pool.
      duplicates: (name, (ids int64 (N,), duplicate group int (N,))) of a dedup file covering the
        pool's ids, or None.
    Raises:
      ValueError: a file whose ids are not exactly the pool's (named, with an example id),
        non-finite scores, weights that do not match the files, bad config values.
    """
    pool_ids = np.asarray(source.ids, np.int64)
    if config.weights and len(config.weights) != len(ratings):
        raise ValueError(
            f"select.weights has {len(config.weights)} values for "
            f"{len(ratings)} ratings files ({', '.join(ratings)}); give one per "
            "file, in order, or none for equal weights"
        )
    columns = []
    for name, (ids, scores) in ratings.items():
        origin = f"ratings file {name}"
        scores = np.asarray(scores, np.float64)
        check_finite(scores, origin)
        aligned = np.empty(len(pool_ids))
        aligned[pool_positions(ids, pool_ids, origin, cover=True)] = scores
        columns.append(aligned)
    grouping, groups, names = resolve_grouping(
        source, config.group_by, config.clusters, config.seed, config.min_cluster_size
    )
    shrunk = [shrunk_offsets(robust_z(column), groups) for column in columns]
    reliability = None
    if config.weights:
        weights = [float(w) for w in config.weights]
    elif config.fusion == "reliability" and len(columns) > 1:
        chosen, reliability = reliability_weights([adjusted for adjusted, _ in shrunk])
        weights = [round(float(w), 6) for w in chosen]
    else:
        weights = [1.0] * len(columns)
    ranked = [adjusted for adjusted, _ in shrunk] if config.ranking == "shrunk" else columns
    policy_groups = groups if config.ranking == "within" else None
    if columns:
        fused = fuse(ranked, weights, policy_groups)
        scores = ranked[0] if len(columns) == 1 else fused
    else:
        fused = scores = np.zeros(len(pool_ids))
    eligible = np.ones(len(pool_ids), bool)
    if duplicates is not None:
        name, (ids, duplicate_groups) = duplicates
        grouped = np.empty(len(pool_ids), np.int64)
        grouped[pool_positions(ids, pool_ids, f"dedup file {name}", cover=True)] = duplicate_groups
        eligible = best_of_duplicates(fused, pool_ids, grouped)
    return RankingScores(
        pool_ids,
        scores,
        eligible,
        groups,
        names,
        grouping,
        list(ratings),
        weights,
        None if duplicates is None else duplicates[0],
        config.ranking,
        policy_groups,
        reliability,
        [offsets for _, offsets in shrunk],
    )


def select_for_source(
    config: SelectConfig,
    ratings: Mapping[str, tuple[np.ndarray, np.ndarray]],
    source: Source,
    *,
    duplicates: tuple[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Selects from the ratings of the pool `source` as `config` says.

    Args:
      config: the `select` section.
      ratings, source, duplicates: see `ranking_scores`.
    Returns:
      (selected ids int64 ascending, the summary: `summarize`'s dict of the ranked scores plus
      "policy", "keep", "group_by" — the grouping used, `auto` resolved —, "kmeans" — its
      clusters and min_cluster_size when that grouping is kmeans, else None —, "ranking",
      "ratings", "weights", "reliability", "dedup", "duplicates_collapsed" (the number of
      samples made ineligible) and "clusters" (`describe_clusters`)).
    Raises:
      ValueError: see `ranking_scores`; also bad policy parameters or a keep larger than the
        eligible part of the pool.
    """
    params = _policy_params(config)
    ranked = ranking_scores(config, ratings, source, duplicates=duplicates)
    selected = select(
        ranked.scores, ranked.ids, seed=config.seed, **_policy_arguments(config, ranked, params)
    )
    summary = summarize(
        ranked.scores,
        ranked.ids,
        selected,
        ranked.groups,
        ranked.names,
        {**params, "seed": config.seed},
    )
    return selected, {
        "policy": config.policy,
        "keep": config.keep,
        "group_by": ranked.grouping,
        "kmeans": {"clusters": config.clusters, "min_cluster_size": config.min_cluster_size}
        if ranked.grouping == "kmeans"
        else None,
        "ranking": ranked.ranking,
        "ratings": ranked.ratings,
        "weights": ranked.weights,
        "reliability": None
        if ranked.reliability is None
        else dict(zip(ranked.ratings, (round(float(r), 6) for r in ranked.reliability))),
        "dedup": ranked.dedup,
        "duplicates_collapsed": int((~ranked.eligible).sum()),
        **summary,
        "clusters": describe_clusters(ranked, selected, source),
    }


def inclusion_for_source(
    config: SelectConfig,
    ratings: Mapping[str, tuple[np.ndarray, np.ndarray]],
    source: Source,
    *,
    duplicates: tuple[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(the pool's ids int64 (N,), each one's exact probability of being selected float64 (N,))
    by `select_for_source` with the same arguments, over the policy's random draw
    (`policies.inclusion_probabilities`: policies that draw uniformly from a ranked set, such as
    the default `filter`). Raises as `select_for_source`, and for other policies."""
    params = _policy_params(config)
    ranked = ranking_scores(config, ratings, source, duplicates=duplicates)
    probabilities = inclusion_probabilities(
        ranked.scores, ranked.ids, **_policy_arguments(config, ranked, params)
    )
    return ranked.ids, probabilities


def _policy_arguments(
    config: SelectConfig, ranked: RankingScores, params: dict[str, Any]
) -> dict[str, Any]:
    """What `select` and `inclusion_probabilities` take besides scores, ids and seed: the
    policy, keep, its `params` (`_policy_params`), and the ranking's policy groups and eligible
    samples."""
    return {
        "policy": config.policy,
        "keep": config.keep,
        "groups": ranked.policy_groups,
        "eligible": ranked.eligible,
        **params,
    }


def _policy_params(config: SelectConfig) -> dict[str, Any]:
    """The policy's parameters from the `select` section, defaults filled in and validated."""
    return resolve_params(
        config.policy,
        config.keep,
        **{name: getattr(config, name) for name in POLICY_PARAMETERS[config.policy]},
    )


def describe_clusters(
    ranked: RankingScores, selected: np.ndarray, source: Source
) -> list[dict[str, Any]]:
    """The ranking clusters for the summary and the report, largest first (at most
    MAX_SUMMARY_CLUSTERS): name, size, kept, keep_rate, per ratings file the cluster's mean
    offset and the part of it removed (robust z units, `ranking.Offsets`), and CLUSTER_EXAMPLES
    members — the best, middle and worst by the ranked score — as {id, caption, kept}."""
    chosen = np.isin(ranked.ids, selected)
    sizes = np.bincount(ranked.groups, minlength=len(ranked.names))
    order = np.argsort(-sizes, kind="stable")[:MAX_SUMMARY_CLUSTERS]
    first = source[0] if len(source) else {}
    described = []
    for group in order:
        members = np.flatnonzero(ranked.groups == group)
        if not len(members):
            continue
        by_score = members[np.argsort(-ranked.scores[members], kind="stable")]
        spots = np.linspace(0, len(by_score) - 1, CLUSTER_EXAMPLES).round().astype(np.int64)
        picks = by_score[np.unique(spots)]
        examples = [
            {
                "id": int(ranked.ids[p]),
                "caption": str(source[int(p)]["caption"]) if "caption" in first else None,
                "kept": bool(chosen[p]),
            }
            for p in picks.astype(np.int64)
        ]
        described.append(
            {
                "name": ranked.names[group],
                "size": int(len(members)),
                "kept": int(chosen[members].sum()),
                "keep_rate": round(float(chosen[members].mean()), 6),
                "offsets": {
                    name: {
                        "mean": round(float(off.means[group]), 4),
                        "removed": round(float(off.cluster_removed[group]), 4),
                    }
                    for name, off in zip(ranked.ratings, ranked.offsets)
                },
                "examples": examples,
            }
        )
    return described


def read_ratings(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 (N,), scores float64 (N,)) of a ratings.parquet (columns `id`, `score`).

    Raises:
      ValueError: a missing or unreadable file, a missing or non-numeric column, null values.
    """
    table = read_parquet(
        path,
        ("id", "score"),
        what="ratings file",
        types={"id": pa.types.is_integer, "score": pa.types.is_floating},
    )
    return (
        table.column("id").to_numpy().astype(np.int64),
        table.column("score").to_numpy().astype(np.float64),
    )


def write_selection(out: Path, selected: np.ndarray, summary: dict[str, Any]) -> None:
    """Writes `out` (Parquet, column `id` int64; the recipe — policy, keep, grouping,
    parameters and the inputs: ratings files, weights, dedup file — as JSON in the file
    metadata, those of them the summary has) and the summary as `out.with_suffix('.json')`,
    both atomically.

    Raises:
      ValueError: `out` ends in .json, the summary's own name.
    """
    out = Path(out)
    if out.suffix == ".json":
        raise ValueError(
            f"select --out {out}: the summary is written beside the selection as <out>.json; "
            "give the selection another name, e.g. .parquet"
        )
    recipe = {key: summary[key] for key in RECIPE_KEYS if key in summary}
    table = pa.table({"id": pa.array(np.asarray(selected, np.int64), pa.int64())})
    table = table.replace_schema_metadata({PARQUET_METADATA_KEY: json.dumps(recipe)})
    atomic_write_parquet(out, table)
    atomic_write_json(out.with_suffix(".json"), summary)


def run(
    cfg: Config, ratings: Path | Sequence[Path], out: Path, dedup: Path | None = None
) -> dict[str, Any]:
    """`alchemist-jax select`: reads the ratings file(s) (and the dedup file), selects from the
    pool of `cfg.data` with `cfg.select`, writes `out` and its summary (`write_selection`),
    prints a short account and returns the summary."""
    from alchemist_jax.data import load_splits

    paths = [Path(ratings)] if isinstance(ratings, (str, Path)) else [Path(p) for p in ratings]
    if not paths:
        raise ValueError("select needs at least one ratings file")
    resolved = [path.resolve() for path in paths]
    repeated = [p for n, p in enumerate(paths) if resolved[n] in resolved[:n]]
    if repeated:
        raise ValueError(
            f"ratings file {repeated[0]} is given twice; use select.weights to weigh a file more"
        )
    read = {str(path): read_ratings(path) for path in paths}
    duplicates = None
    if dedup is not None:
        from alchemist_jax.dedup import read_groups

        duplicates = (str(dedup), read_groups(Path(dedup)))
    pool = load_splits(cfg.data).train
    selected, summary = select_for_source(cfg.select, read, pool, duplicates=duplicates)
    write_selection(Path(out), selected, summary)
    rates = summary["cluster_keep_rates"].values()
    collapsed = (
        f", {summary['duplicates_collapsed']} duplicates collapsed" if dedup is not None else ""
    )
    fused = ""
    if len(paths) > 1:
        origin = "given" if cfg.select.weights else cfg.select.fusion
        if summary["reliability"] is not None and not any(summary["reliability"].values()):
            origin = "equal (no scorer separates a low tail)"
        total = sum(summary["weights"])
        shares = (f"{path.name} {w / total:.2f}" for path, w in zip(paths, summary["weights"]))
        fused = f", {origin} weights {' / '.join(shares)}"
    print(
        f"selected {summary['count']} of {summary['pool_size']} samples "
        f"({summary['policy']}, keep {summary['keep']}, {len(paths)} ratings "
        f"file{'s' * (len(paths) > 1)}{fused}{collapsed}) in {len(rates)} clusters by "
        f"{summary['group_by']}: keep rate per cluster {min(rates):.3f}-{max(rates):.3f}; "
        f"wrote {out}"
    )
    return summary
