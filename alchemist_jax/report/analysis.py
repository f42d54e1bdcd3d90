"""What the report's sections compute from a run folder: rater AUROCs per defect kind, the
contact sheets by rating, kept fractions per defect kind, mean validation-loss curves and the
contribution of each component of the method (recomputing each arm's ranking score)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from alchemist_jax.evaluation.defects import credit_kept_copies, defect_auroc
from alchemist_jax.report.results_table import format_mean_std, mean_std
from alchemist_jax.report.run_folder import CLEAN, RunFolder, lookup, read_selection
from alchemist_jax.runtime import io
from alchemist_jax.runtime.stats import normalize_within_groups

# The pipeline arms that add one component of the method at a time (pipeline.ARMS), in order.
COMPONENT_ARMS = ("meta_only", "meta_alignment", "alchemist")
SHEET_SIZE = 12  # examples per contact sheet (two rows of six)


def rater_aurocs(run: RunFolder) -> dict[str, dict[str, float]]:
    """rating file stem -> `defect_auroc` of its scores (z-scored within caption class when
    the classes are known)."""
    table = {}
    for name, (ids, scores) in run.ratings.items():
        where = f"ratings/{name}.parquet"
        kinds = run.kinds(ids, where)
        table[name] = defect_auroc(
            scores, [None if k == CLEAN else k for k in kinds], run.groups(ids, where)
        )
    return table


@dataclasses.dataclass
class Sheets:
    """The contact sheets of the pool by one rating."""

    position: dict[int, int]  # pool id -> index in run.pool
    notes: dict[int, str]  # pool id -> "kind · z" label
    sheets: list[tuple[str, np.ndarray]]  # (title, ids) of top, middle, bottom (and pruned)
    pruned: tuple[int, int] | None  # (shown, total) pruned samples, None without a selection


def rating_sheets(run: RunFolder, name: str) -> Sheets:
    """The best, middle and worst SHEET_SIZE samples by ratings/`name` (z-scored within caption
    class) and a random SHEET_SIZE of the samples selections/alchemist.parquet prunes by its
    score (`pruned_by_score`)."""
    ids, scores = run.ratings[name]
    where = f"ratings/{name}.parquet"
    position = {int(i): n for n, i in enumerate(run.pool.ids)}
    lookup(position, ids, where, "the pool of config.yaml")
    z = normalize_within_groups(scores, run.groups(ids, where))
    z_of = dict(zip(ids.tolist(), z))
    kind_of = run.defects or {}

    def note(sample_id: int) -> str:
        parts = [kind_of[sample_id]] if sample_id in kind_of else []
        if sample_id in z_of:
            parts.append(f"z {z_of[sample_id]:+.2f}")
        return " · ".join(parts)

    order = ids[np.argsort(-z, kind="stable")]  # best first
    middle = max(0, len(order) // 2 - SHEET_SIZE // 2)
    sheets = [
        ("top", order[:SHEET_SIZE]),
        ("middle", order[middle : middle + SHEET_SIZE]),
        ("bottom", order[::-1][:SHEET_SIZE]),
    ]
    pruned = pruned_by_score(run, "alchemist")
    pruned_count = None
    if pruned is not None:
        rng = np.random.default_rng(run.cfg.data.seed)
        sample = np.sort(rng.choice(pruned, size=min(SHEET_SIZE, len(pruned)), replace=False))
        if len(sample):
            sheets.append(("pruned", sample))
        pruned_count = (len(sample), len(pruned))
    notes = {int(i): note(int(i)) for _, chosen in sheets for i in chosen}
    return Sheets(position, notes, sheets, pruned_count)


def kept_fractions(
    run: RunFolder, selections: dict[str, np.ndarray]
) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per arm, the number kept and the fraction of each kind of pool sample
    (CLEAN, then each defect kind) that it keeps."""
    kinds = sorted(set(run.defects.values()) - {CLEAN})
    header = ["arm", "kept", CLEAN, *kinds]
    totals = {k: sum(1 for v in run.defects.values() if v == k) for k in [CLEAN, *kinds]}
    rows = []
    for arm, ids in selections.items():
        chosen = run.kinds(ids, f"selections/{arm}.parquet")
        rows.append(
            [
                arm,
                str(len(ids)),
                *(
                    f"{chosen.count(k) / totals[k]:.2f}" if totals[k] else "n/a"
                    for k in [CLEAN, *kinds]
                ),
            ]
        )
    return header, rows


def mean_curve(seeds: dict[int, tuple[np.ndarray, np.ndarray]]) -> tuple[list, list]:
    """(steps, mean value) over the seeds' curves, at the steps every seed logged."""
    common = sorted(set.intersection(*(set(s.tolist()) for s, _ in seeds.values())))
    mean = [np.mean([v[s == step][0] for s, v in seeds.values()]) for step in common]
    return common, mean


def component_table(
    run: RunFolder, summaries: dict[str, dict], rows: list[dict]
) -> tuple[list[str], list[list[str]]]:
    """(header, body) of the component contributions: per arm of COMPONENT_ARMS, the files it
    ranks by, test loss and FCD (mean ± sample std over its equal-steps seeds in `rows`) and,
    when they can be recomputed, the AUROC per defect kind of its ranking score."""
    aurocs = component_aurocs(run, summaries)
    kinds = sorted({kind for result in aurocs.values() for kind in result} - {"all"})
    header = ["arm", "ranks by", "test loss ↓", "FCD ↓", *(["AUROC all", *kinds] if aurocs else [])]
    body = []
    for arm, summary in summaries.items():
        inputs = [Path(name).stem for name in summary["ratings"]]
        if summary.get("dedup"):
            inputs.append("dedup")
        seeds = [r for r in rows if r.get("run") == arm and r.get("budget") == "steps"]
        metrics = [
            format_mean_std(*mean_std([r.get(m) for r in seeds])) for m in ("test_loss", "fcd")
        ]
        result = aurocs.get(arm, {})
        cells = [f"{result[k]:.3f}" if k in result else "n/a" for k in ["all", *kinds]]
        body.append([arm, " + ".join(inputs), *metrics, *(cells if aurocs else [])])
    return header, body


def arm_ranking(run: RunFolder, arm: str, summary: dict):
    """The `selection.RankingScores` arm's selection ranked by, recomputed from the ratings and
    dedup files its summary names (run-relative) once per run (`run.rankings`); None, noted in
    run.missing, when one is missing."""
    if arm not in run.rankings:
        run.rankings[arm] = _recompute_ranking(run, arm, summary)
    return run.rankings[arm]


def _recompute_ranking(run: RunFolder, arm: str, summary: dict):
    from alchemist_jax import dedup, selection

    files = [*summary.get("ratings", ()), *([summary["dedup"]] if summary.get("dedup") else [])]
    absent = [name for name in files if not (run.workdir / name).exists()]
    if absent or not summary.get("ratings"):
        what = absent[0] if absent else f"selections/{arm}.json names no ratings"
        run.missing.append(f"{what}: the ranking of arm {arm} is not known")
        return None
    ratings = {name: selection.read_ratings(run.workdir / name) for name in summary["ratings"]}
    duplicates = (
        None
        if not summary.get("dedup")
        else (summary["dedup"], dedup.read_groups(run.workdir / summary["dedup"]))
    )
    config = dataclasses.replace(run.cfg.select, weights=tuple(summary.get("weights", ())))
    return selection.ranking_scores(config, ratings, run.pool, duplicates=duplicates)


def pruned_by_score(run: RunFolder, arm: str) -> np.ndarray | None:
    """Ids of the pool samples selections/`arm` prunes by its score: collapsed into a better
    member of their duplicate group, or ranked below every sample the selection keeps from
    their ranking group (for `filter`, the dropped lowest fraction; a random fill's losers are
    not among them). None, noted in run.missing, without the selection or its ranking."""
    path = run.workdir / "selections" / f"{arm}.parquet"
    if not path.exists() or not path.with_suffix(".json").exists():
        run.missing.append(f"selections/{arm}.parquet: no contact sheet of pruned samples")
        return None
    ranked = arm_ranking(run, arm, io.read_json(path.with_suffix(".json")))
    if ranked is None:
        return None
    kept = np.isin(ranked.ids, read_selection(path))
    groups = (
        np.zeros(len(ranked.ids), np.int64)
        if ranked.policy_groups is None
        else np.asarray(ranked.policy_groups)
    )
    lowest_kept = np.full(groups.max() + 1, np.inf)
    np.minimum.at(lowest_kept, groups[kept], ranked.scores[kept])
    below = ranked.eligible & (ranked.scores < lowest_kept[groups])
    return ranked.ids[~kept & (below | ~ranked.eligible)]


def component_aurocs(run: RunFolder, summaries: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """arm -> `defect_auroc` of the score its selection ranks by (collapsed duplicates 1e-6 of
    the score range below the lowest score), recomputed from its ratings and dedup files; {}
    when the pool or the defects are missing, no entry for an arm whose file is missing (both
    noted in run.missing)."""
    if run.pool is None or run.defects is None:
        run.missing.append("component AUROC: needs the pool of config.yaml and defects.parquet")
        return {}
    aurocs = {}
    for arm, summary in summaries.items():
        ranked = arm_ranking(run, arm, summary)
        if ranked is None:
            continue
        low, high = ranked.scores.min(), ranked.scores.max()
        scores = np.where(ranked.eligible, ranked.scores, low - 1e-6 * ((high - low) or 1.0))
        where = f"selections/{arm}.json"
        kinds = [None if k == CLEAN else k for k in run.kinds(ranked.ids, where)]
        if ranked.dedup is not None:
            kinds = credit_kept_copies(kinds, ranked.ids, ranked.eligible, run.copied_from)
        aurocs[arm] = defect_auroc(scores, kinds, run.groups(ranked.ids, where))
    return aurocs
