"""The visual report of a pipeline run: one static HTML page and its PNGs, viewable offline.

    path = report.build(Path("runs/demo"))        # writes runs/demo/report/index.html

It reads the run folder written by `alchemist-jax pipeline` (config.yaml, defects.parquet,
ratings/, selections/, train/, eval/, results.json, rate/) and shows every part that exists:
the configuration, rating histograms coloured by defect kind, the AUROC of each rater per defect
kind, contact sheets of the best, middle, worst and pruned samples, the rank histograms of the
selections, validation-loss curves, the final method x metric table (also written as
report/results.md), the contribution of each component of the method (meta rater, + alignment,
+ dedup: test loss, FCD and AUROC per defect kind of the score each arm ranks by) and the rating
curves and generated samples. A part whose inputs are absent (no defects, fewer arms, a single
seed, a run still in progress) is left out and listed on the page under "Not in this run".
Malformed inputs (a Parquet file without its columns, duplicate ids, a results row without its
arm) stop the build with a one-line ValueError naming the file.
The page uses relative links and inline CSS only; every file is written atomically.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from alchemist_jax import config as config_lib
from alchemist_jax.data.cache import DataUnavailableError
from alchemist_jax.runtime.io import atomic_save_figure, atomic_write_bytes
from alchemist_jax.data.sources import Source
from alchemist_jax.evaluation.defects import (credit_kept_copies, defect_auroc,
                                      normalize_within_groups)

# Metric of results.json -> (column title, which way is better).
METRICS = {"test_loss": ("test loss ↓", "min"), "fcd": ("FCD ↓", "min"),
           "alignment": ("alignment ↑", "max")}
BUDGETS = ("steps", "epochs")
# The pipeline arms that add one component of the method at a time (pipeline.ARMS), in order.
COMPONENT_ARMS = ("meta_only", "meta_alignment", "alchemist")
SHEET_SIZE = 12  # examples per contact sheet (two rows of six)
CLEAN = "clean"


# ----------------------------------------------------------------------------------------------
# The final results table (pure; the pipeline prints the markdown version)
# ----------------------------------------------------------------------------------------------


def results_table_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The method x metric table of `rows` (results.json) as markdown, one block per budget.

    Each line is one run (arm at equal steps, or `<arm>-epochs` at equal epochs) with its seed
    count, steps, training-set size and, per metric, `mean ± std` over its seeds (std with
    ddof=1, the sample standard deviation; a single seed shows the mean alone). The best mean
    of each metric column within a block is bold (`**...**`): lowest test loss and FCD, highest
    alignment. A metric absent or null in every seed of a run shows `n/a`.

    Raises:
      ValueError: a row without `arm`, `run`, `budget` or `seed`, an unknown budget, or the
        same (run, budget, seed) twice.
    """
    parts = []
    for budget, header, body in _result_blocks(rows):
        parts.append(f"**equal {budget}**\n")
        parts.append("| " + " | ".join(header) + " |")
        parts.append("|" + "---|" * len(header))
        for cells in body:
            parts.append("| " + " | ".join(f"**{text}**" if bold else text
                                           for text, bold in cells) + " |")
        parts.append("")
    return "\n".join(parts)


def _result_blocks(rows: Sequence[dict[str, Any]]
                   ) -> list[tuple[str, list[str], list[list[tuple[str, bool]]]]]:
    """(budget, column titles, lines of (cell text, is best)) per budget present in `rows`."""
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    seen = set()
    for number, row in enumerate(rows):
        for key in ("arm", "run", "budget", "seed"):
            if not isinstance(row, dict) or key not in row:
                raise ValueError(f"results.json row {number}: missing {key!r}")
        if row["budget"] not in BUDGETS:
            raise ValueError(f"results.json row {number}: budget {row['budget']!r} is not one of "
                             f"{', '.join(BUDGETS)}")
        key = (row["run"], row["budget"], row["seed"])
        if key in seen:
            raise ValueError(f"results.json row {number}: run {row['run']!r} budget "
                             f"{row['budget']!r} seed {row['seed']!r} appears twice")
        seen.add(key)
        runs.setdefault((row["budget"], row["run"]), []).append(row)

    blocks = []
    for budget in BUDGETS:
        lines = [(run, seeds) for (b, run), seeds in runs.items() if b == budget]
        if not lines:
            continue
        stats = {metric: [_mean_std([s.get(metric) for s in seeds]) for _, seeds in lines]
                 for metric in METRICS}
        best = {metric: _best([m for m, _ in stats[metric]], METRICS[metric][1])
                for metric in METRICS}
        header = ["run", "seeds", "steps", "train size", *(title for title, _ in METRICS.values())]
        body = []
        for k, (run, seeds) in enumerate(lines):
            cells = [(run, False), (str(len(seeds)), False),
                     (_distinct(s.get("steps") for s in seeds), False),
                     (_distinct(s.get("train_size") for s in seeds), False)]
            for metric in METRICS:
                mean, std = stats[metric][k]
                cells.append((_format_mean_std(mean, std),
                              mean is not None and mean == best[metric]))
            body.append(cells)
        blocks.append((budget, header, body))
    return blocks


def _mean_std(values: list[Any]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof=1) of the non-null values; std None for fewer than two."""
    present = np.array([v for v in values if v is not None], np.float64)
    if len(present) == 0:
        return None, None
    return float(present.mean()), float(present.std(ddof=1)) if len(present) > 1 else None


def _best(means: list[float | None], direction: str) -> float | None:
    present = [m for m in means if m is not None and np.isfinite(m)]
    if not present:
        return None
    return min(present) if direction == "min" else max(present)


def _format_mean_std(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _distinct(values) -> str:
    """The distinct values, in order, joined by '/' (seeds of one run normally agree)."""
    return "/".join(dict.fromkeys(str(v) for v in values if v is not None)) or "n/a"


# ----------------------------------------------------------------------------------------------
# Reading the run folder
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _RunFolder:
    """What the report knows of a run folder; `missing` collects what it could not show."""

    workdir: Path
    out: Path
    cfg: config_lib.Config | None = None
    pool: Source | None = None  # the corrupted training pool, when it could be opened
    classes: dict[int, int] | None = None  # pool id -> caption class
    defects: dict[int, str] | None = None  # pool id -> defect kind or CLEAN
    copied_from: dict[int, int] = dataclasses.field(default_factory=dict)  # exact duplicates
    ratings: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)
    missing: list[str] = dataclasses.field(default_factory=list)

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.workdir))

    def groups(self, ids: np.ndarray, where: str) -> np.ndarray | None:
        """(N,) caption class of each id of file `where`, or None when the classes are unknown."""
        if self.classes is None:
            return None
        return np.array(_lookup(self.classes, ids, where, "the pool of config.yaml"))

    def kinds(self, ids: np.ndarray, where: str) -> list[str]:
        """Defect kind (or CLEAN) of each id of file `where`."""
        return _lookup(self.defects, ids, where, "defects.parquet")


def _lookup(mapping: dict[int, Any], ids: np.ndarray, where: str, known_in: str) -> list[Any]:
    """`mapping[id]` for each of `ids` (read from file `where`); a one-line ValueError when
    some id is not in `mapping` (built from `known_in`)."""
    unknown = [int(i) for i in ids if int(i) not in mapping]
    if unknown:
        raise ValueError(f"{where}: {len(unknown)} of {len(ids)} ids are not in {known_in} "
                         f"(first: {unknown[0]})")
    return [mapping[int(i)] for i in ids]


def _load_run(workdir: Path) -> _RunFolder:
    run = _RunFolder(workdir, workdir / "report")
    config_path = workdir / "config.yaml"
    if config_path.exists():
        try:
            run.cfg = config_lib.load_config(config_path)
        except config_lib.ConfigError as error:
            raise ValueError(f"{config_path}: {error}") from None
    else:
        run.missing.append("config.yaml: no configuration summary, no caption classes and no "
                           "contact sheets (they need the pool the config names)")
    defects_path = workdir / "defects.parquet"
    if defects_path.exists():
        table = _read_parquet(defects_path, ("id", "defect"))
        ids = _unique_ids(table.column("id").to_numpy(), defects_path)
        run.defects = {int(i): kind or CLEAN
                       for i, kind in zip(ids, table.column("defect").to_pylist())}
        if "source_id" in table.column_names:
            run.copied_from = {
                int(i): int(source) for i, kind, source in zip(
                    ids, table.column("defect").to_pylist(),
                    table.column("source_id").to_pylist()) if kind == "duplicate"}
    else:
        run.missing.append("defects.parquet: no injected defects, so no AUROC table and no "
                           "defect colouring")
    paths = sorted((workdir / "ratings").glob("*.parquet"),
                   key=lambda p: ({"exact": 0, "penalty": 1}.get(p.stem, 2), p.stem))
    for path in paths:
        table = _read_parquet(path, ("id", "score"))
        run.ratings[path.stem] = (_unique_ids(table.column("id").to_numpy(), path),
                                  table.column("score").to_numpy().astype(np.float64))
    if not run.ratings:
        run.missing.append("ratings/*.parquet: no ratings, so no rating histograms, AUROC "
                           "table or samples by rating")
    if run.cfg is not None:
        _open_pool(run)
    return run


def _open_pool(run: _RunFolder) -> None:
    """Opens the corrupted training pool and its caption classes, or notes why it could not."""
    from alchemist_jax import data

    try:
        splits = data.load_splits(run.cfg.data)
    except (ValueError, OSError, DataUnavailableError) as error:
        run.missing.append(f"the pool {run.cfg.data.source!r} could not be opened ({error}): "
                           "no contact sheets, no caption classes")
        return
    run.pool = splits.train
    if splits.caption_classes is not None:
        run.classes = {int(i): int(c) for i, c in zip(splits.train.ids, splits.caption_classes)}


def _read_parquet(path: Path, columns: Sequence[str]):
    table = pq.read_table(path)
    for column in columns:
        if column not in table.column_names:
            raise ValueError(f"{path}: no column {column!r} (columns: "
                             f"{', '.join(table.column_names)})")
    return table


def _unique_ids(ids: np.ndarray, path: Path) -> np.ndarray:
    ids = np.asarray(ids, np.int64)
    values, counts = np.unique(ids, return_counts=True)
    repeated = counts > 1
    if repeated.any():
        raise ValueError(f"{path}: id {int(values[repeated][0])} appears "
                         f"{int(counts[repeated][0])} times")
    return ids


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def _read_val_loss(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(steps, val_loss) of a metrics.jsonl, one point per step (a resumed run's repeat wins)."""
    points = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}: line {number} is not valid JSON") from None
        if "val_loss" in record:
            points[int(record["step"])] = float(record["val_loss"])
    steps = np.array(sorted(points), np.int64)
    return steps, np.array([points[s] for s in steps], np.float64)


def _seed_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """(seed, folder) of every `seed<S>` folder of a train or eval run, by seed."""
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if p.is_dir() and (m := re.fullmatch(r"seed(\d+)", p.name))]
    return sorted(found)


# ----------------------------------------------------------------------------------------------
# Sections: each returns its HTML, or None (and a note in run.missing) when its inputs are absent
# ----------------------------------------------------------------------------------------------


def _config_section(run: _RunFolder) -> str | None:
    if run.cfg is None:
        return None
    cfg = run.cfg
    corrupt = cfg.data.corrupt
    pool_size = len(run.pool) if run.pool is not None else "unknown (pool not opened)"
    rate = f"{cfg.rate.mode}, {cfg.rate.steps} meta-steps (K={cfg.rate.inner_steps}, " \
           f"population {cfg.rate.population})"
    facts = [
        ("source", cfg.data.source),
        ("pool size", pool_size),
        ("defect fraction", f"{corrupt.fraction:g}" + (
            f" ({', '.join(corrupt.kinds)}; seed {corrupt.seed})" if corrupt.fraction else "")),
        ("model preset", cfg.model.preset),
        ("rating", rate),
        ("arms", ", ".join(cfg.pipeline.arms)),
        ("keep", f"{cfg.pipeline.keep:g}"),
        ("budget", f"{cfg.pipeline.budget} ({cfg.train.steps} training steps at batch "
                   f"{cfg.train.batch_size})"),
        ("seeds", ", ".join(map(str, cfg.pipeline.seeds))),
    ]
    if "release" in cfg.pipeline.arms:
        facts.insert(5, ("penalty rater (release)",
                         f"{cfg.pipeline.penalty_steps or cfg.rate.steps} meta-steps"))
    return _section("Configuration", _table(["setting", "value"],
                                            [[name, str(value)] for name, value in facts],
                                            css_class="text"))


def _ratings_section(run: _RunFolder) -> str | None:
    if not run.ratings:
        return None
    plt = _pyplot()
    names = list(run.ratings)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names):
        ids, scores = run.ratings[name]
        edges = np.histogram_bin_edges(scores, bins=40)
        if run.defects is None:
            ax.hist(scores, bins=edges, color=_kind_colour(CLEAN))
        else:
            kinds = np.array(run.kinds(ids, f"ratings/{name}.parquet"))
            present = _kind_order(kinds)
            ax.hist([scores[kinds == k] for k in present], bins=edges, stacked=True,
                    color=[_kind_colour(k) for k in present], label=present)
            ax.legend(fontsize=6)
        ax.set_title(f"{name} ({len(scores)} samples)", fontsize=9)
        ax.set_xlabel("score (higher = better)", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, run.out / "ratings.png")
    caption = ("Stacked by defect kind (defects.parquet)." if run.defects is not None
               else "No defect truth: one colour.")
    return _section("Ratings", f"<p>{caption}</p>" + _figure("ratings.png"))


def _auroc_section(run: _RunFolder) -> str | None:
    if run.defects is None or not run.ratings:
        return None
    if set(run.defects.values()) == {CLEAN}:
        run.missing.append("defects.parquet lists no defective sample: no AUROC table")
        return None
    table = {}
    for name, (ids, scores) in run.ratings.items():
        where = f"ratings/{name}.parquet"
        kinds = run.kinds(ids, where)
        table[name] = defect_auroc(scores, [None if k == CLEAN else k for k in kinds],
                                   run.groups(ids, where))
    columns = ["all", *sorted({kind for result in table.values() for kind in result} - {"all"})]
    rows = [[name, *(f"{result[c]:.3f}" if c in result else "n/a" for c in columns)]
            for name, result in table.items()]
    within = ("within caption class" if run.classes is not None
              else "globally (caption classes unknown)")
    text = (f"<p>AUROC of clean (positive) against each defect kind, scores z-scored {within}; "
            "0.5 is chance, 1 a perfect separation.</p>")
    return _section("Rater AUROC by defect kind",
                    text + _table(["rater", *columns], rows, table_id="auroc"))


def _samples_section(run: _RunFolder) -> str | None:
    if run.pool is None or not run.ratings:
        return None
    from alchemist_jax.data import summary

    name = "exact" if "exact" in run.ratings else next(iter(run.ratings))
    ids, scores = run.ratings[name]
    where = f"ratings/{name}.parquet"
    position = {int(i): n for n, i in enumerate(run.pool.ids)}
    _lookup(position, ids, where, "the pool of config.yaml")
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
    sheets = [("top", order[:SHEET_SIZE]), ("middle", order[middle:middle + SHEET_SIZE]),
              ("bottom", order[::-1][:SHEET_SIZE])]
    selection_path = run.workdir / "selections" / "alchemist.parquet"
    pruned_text = ""
    if selection_path.exists():
        kept = set(_read_selection(selection_path).tolist())
        pruned = np.array([i for i in run.pool.ids if int(i) not in kept], np.int64)
        rng = np.random.default_rng(run.cfg.data.seed)
        sample = np.sort(rng.choice(pruned, size=min(SHEET_SIZE, len(pruned)), replace=False))
        if len(sample):
            sheets.append(("pruned", sample))
        pruned_text = f" Pruned: a random {len(sample)} of the {len(pruned)} pool samples " \
                      "not in selections/alchemist.parquet."
    else:
        run.missing.append("selections/alchemist.parquet: no contact sheet of pruned samples")
    scale = "z-score within caption class" if run.classes is not None else "z-score"
    parts = [f"<p>Ranked by <code>{html.escape(name)}</code> ({scale}); each label shows id, "
             f"caption, defect kind when known and z.{html.escape(pruned_text)}</p>"]
    for title, chosen in tqdm(sheets, desc="contact sheets", leave=False):
        filename = f"samples_{title}.png"
        summary.contact_sheet_of(
            run.pool, [position[int(i)] for i in chosen], run.out / filename,
            title=f"{title} samples by {name}", notes=[note(int(i)) for i in chosen])
        parts.append(f"<h3>{title}</h3>" + _figure(filename))
    return _section("Samples by rating", "".join(parts))


def _selections_section(run: _RunFolder) -> str | None:
    folder = run.workdir / "selections"
    summaries = [(p.stem, _read_json(p)) for p in sorted(folder.glob("*.json"))]
    selections = {p.stem: _read_selection(p) for p in sorted(folder.glob("*.parquet"))}
    if not summaries and not selections:
        run.missing.append("selections/: no selections")
        return None
    parts = []
    if summaries:
        keys = ("policy", "keep", "count", "pool_size", "group_by")
        parts.append(_table(["arm", *keys], [[arm, *(str(s.get(k, "")) for k in keys)]
                                             for arm, s in summaries], table_id="selections"))
    histograms = [(arm, s["rank_histogram"]) for arm, s in summaries if "rank_histogram" in s]
    if histograms:
        plt = _pyplot()
        fig, axes = plt.subplots(1, len(histograms), figsize=(3.6 * len(histograms), 3),
                                 squeeze=False)
        for ax, (arm, histogram) in zip(axes.ravel(), histograms):
            edges, counts = np.asarray(histogram["edges"]), np.asarray(histogram["counts"])
            if len(edges) != len(counts) + 1:
                raise ValueError(f"selections/{arm}.json: rank_histogram has {len(edges)} "
                                 f"edges for {len(counts)} counts")
            ax.stairs(counts, edges, fill=True, alpha=0.8)
            ax.set_title(arm, fontsize=9)
            ax.set_xlabel("rank percentile (0 = best)", fontsize=8)
        axes[0, 0].set_ylabel("chosen samples")
        fig.tight_layout()
        _save(fig, run.out / "rank_histograms.png")
        parts.append("<p>Rank percentile of the chosen samples under the arm's ratings.</p>"
                     + _figure("rank_histograms.png"))
    if selections and run.defects is not None:
        kinds = sorted(set(run.defects.values()) - {CLEAN})
        header = ["arm", "kept", CLEAN, *kinds]
        totals = {k: sum(1 for v in run.defects.values() if v == k) for k in [CLEAN, *kinds]}
        rows = []
        for arm, ids in selections.items():
            chosen = run.kinds(ids, f"selections/{arm}.parquet")
            rows.append([arm, str(len(ids)), *(
                f"{chosen.count(k) / totals[k]:.2f}" if totals[k] else "n/a"
                for k in [CLEAN, *kinds])])
        parts.append("<p>Fraction of each kind of pool sample that the arm keeps.</p>"
                     + _table(header, rows, table_id="kept"))
    return _section("Selections", "".join(parts))


def _curves_section(run: _RunFolder) -> str | None:
    curves = {}
    train = run.workdir / "train"
    for run_dir in sorted(p for p in train.glob("*") if p.is_dir()):
        seeds = {seed: _read_val_loss(d / "metrics.jsonl") for seed, d in _seed_dirs(run_dir)
                 if (d / "metrics.jsonl").exists()}
        seeds = {seed: curve for seed, curve in seeds.items() if len(curve[0])}
        if seeds:
            curves[run_dir.name] = seeds
    if not curves:
        run.missing.append("train/*/seed*/metrics.jsonl: no validation-loss curves")
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    colours = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    for k, (name, seeds) in enumerate(curves.items()):
        colour = colours(k % colours.N)
        style = "--" if name.endswith("-epochs") else "-"
        for steps, values in seeds.values():
            ax.plot(steps, values, style, color=colour, linewidth=0.7, alpha=0.5)
        common = sorted(set.intersection(*(set(s.tolist()) for s, _ in seeds.values())))
        mean = [np.mean([v[s == step][0] for s, v in seeds.values()]) for step in common]
        ax.plot(common, mean, style, color=colour, linewidth=2,
                label=f"{name} ({len(seeds)} seed{'s' * (len(seeds) > 1)})")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, run.out / "val_loss.png")
    return _section("Validation loss", "<p>Thin lines: seeds; thick: their mean at the steps "
                    "all seeds logged; dashed: equal-epochs runs.</p>" + _figure("val_loss.png"))


def _results_section(run: _RunFolder) -> str | None:
    path = run.workdir / "results.json"
    if not path.exists():
        run.missing.append("results.json: no final results table")
        return None
    rows = _read_json(path)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of result rows")
    atomic_write_bytes(run.out / "results.md", results_table_markdown(rows).encode())
    parts = ["<p>Mean ± sample std (ddof=1) over seeds; a single seed shows the mean; best "
             "of each column in bold. Also in <a href=\"results.md\">results.md</a>.</p>"]
    for budget, header, body in _result_blocks(rows):
        cells = [[f"<b>{html.escape(t)}</b>" if bold else html.escape(t) for t, bold in line]
                 for line in body]
        parts.append(f"<h3>equal {budget}</h3>"
                     + _table(header, cells, table_id=f"results-{budget}", escape=False))
    return _section("Results", "".join(parts))


def _components_section(run: _RunFolder) -> str | None:
    folder = run.workdir / "selections"
    summaries = {arm: _read_json(folder / f"{arm}.json") for arm in COMPONENT_ARMS
                 if (folder / f"{arm}.json").exists()}
    if len(summaries) < 2:
        run.missing.append(f"selections/ holds fewer than two of the arms "
                           f"{', '.join(COMPONENT_ARMS)}: no table of component contributions")
        return None
    for arm, summary in summaries.items():
        if not isinstance(summary, dict) or "ratings" not in summary:
            raise ValueError(f"{folder / arm}.json: no 'ratings' (the files the arm ranked by)")
    results_path = run.workdir / "results.json"
    rows = _read_json(results_path) if results_path.exists() else []
    aurocs = _component_aurocs(run, summaries)
    kinds = sorted({kind for result in aurocs.values() for kind in result} - {"all"})
    header = ["arm", "ranks by", "test loss ↓", "FCD ↓",
              *(["AUROC all", *kinds] if aurocs else [])]
    body = []
    for arm, summary in summaries.items():
        inputs = [Path(name).stem for name in summary["ratings"]]
        if summary.get("dedup"):
            inputs.append("dedup")
        seeds = [r for r in rows if r.get("run") == arm and r.get("budget") == "steps"]
        metrics = [_format_mean_std(*_mean_std([r.get(m) for r in seeds]))
                   for m in ("test_loss", "fcd")]
        result = aurocs.get(arm, {})
        cells = [f"{result[k]:.3f}" if k in result else "n/a" for k in ["all", *kinds]]
        body.append([arm, " + ".join(inputs), *metrics, *(cells if aurocs else [])])
    text = ("<p>Each arm adds one component of the method: the meta-learned rater alone, then "
            "the alignment scorer fused with it (rank percentiles within clusters, "
            "<code>select.weights</code>), then duplicates collapsed before the budget (each "
            "dedup group keeps its best-scored member). Test loss and FCD: mean ± sample std "
            "over seeds at equal steps. AUROC (clean against each defect kind, z-scored within "
            "caption class) of the score the arm's selection ranks by, with collapsed "
            "duplicates below every other sample; an exact copy kept in place of its collapsed "
            "source counts as clean and the source as the duplicate (the two are the same "
            "image and caption).</p>")
    return _section("Component contributions",
                    text + _table(header, body, table_id="components"))


def _component_aurocs(run: _RunFolder, summaries: dict[str, dict]) -> dict[str, dict]:
    """arm -> `defect_auroc` of the score its selection ranks by (collapsed duplicates 1e-6 of
    the score range below the lowest score), recomputed from its ratings and dedup files; {}
    when the pool or the defects are missing, no entry for an arm whose file is missing (both
    noted in run.missing)."""
    from alchemist_jax import dedup, selection

    if run.pool is None or run.defects is None:
        run.missing.append("component AUROC: needs the pool of config.yaml and defects.parquet")
        return {}
    aurocs = {}
    for arm, summary in summaries.items():
        files = [*summary["ratings"], *([summary["dedup"]] if summary.get("dedup") else [])]
        absent = [name for name in files if not (run.workdir / name).exists()]
        if absent:
            run.missing.append(f"{absent[0]}: no component AUROC of arm {arm}")
            continue
        ratings = {name: selection.read_ratings(run.workdir / name)
                   for name in summary["ratings"]}
        duplicates = (None if not summary.get("dedup") else
                      (summary["dedup"], dedup.read_groups(run.workdir / summary["dedup"])))
        config = dataclasses.replace(run.cfg.select, weights=tuple(summary.get("weights", ())))
        ranked = selection.ranking_scores(config, ratings, run.pool, duplicates=duplicates)
        low, high = ranked.scores.min(), ranked.scores.max()
        scores = np.where(ranked.eligible, ranked.scores, low - 1e-6 * ((high - low) or 1.0))
        where = f"selections/{arm}.json"
        kinds = [None if k == CLEAN else k for k in run.kinds(ranked.ids, where)]
        if duplicates is not None:
            kinds = credit_kept_copies(kinds, ranked.ids, ranked.eligible, run.copied_from)
        aurocs[arm] = defect_auroc(scores, kinds, run.groups(ranked.ids, where))
    return aurocs


def _figures_section(run: _RunFolder) -> str | None:
    groups = [
        ("Rating curves", "rate/*/curves.png",
         [(p, f"rate_{p.parent.name}_curves.png")
          for p in sorted((run.workdir / "rate").glob("*/curves.png"))]),
        ("Generated samples", "eval/*/seed*/samples.png",
         [(d / "samples.png", f"eval_{run_dir.name}_seed{seed}.png")
          for run_dir in sorted(p for p in (run.workdir / "eval").glob("*") if p.is_dir())
          for seed, d in _seed_dirs(run_dir) if (d / "samples.png").exists()]),
    ]
    parts = []
    for title, pattern, copies in groups:
        if not copies:
            run.missing.append(f"{pattern}: no {title.lower()}")
            continue
        figures = []
        for source, filename in copies:
            atomic_write_bytes(run.out / filename, source.read_bytes())
            figures.append(f"<figure class=\"thumb\">{_figure(filename)}<figcaption>"
                           f"{html.escape(run.relative(source))}</figcaption></figure>")
        parts.append(f"<h3>{title}</h3><div class=\"thumbs\">{''.join(figures)}</div>")
    if not parts:
        return None
    return _section("Rating curves and generated samples", "".join(parts))


# ----------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------

SECTIONS = (_config_section, _ratings_section, _auroc_section, _samples_section,
            _selections_section, _curves_section, _results_section, _components_section,
            _figures_section)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child, table.text td { text-align: left; }
th { background: #f2f2f2; }
img { max-width: 100%; }
.thumbs { display: flex; flex-wrap: wrap; gap: 1em; }
.thumb { width: 360px; margin: 0; } .thumb img { width: 100%; }
.thumb figcaption { font-size: 0.8em; color: #555; }
.missing { background: #fff6e0; border: 1px solid #e8c77a; padding: 0.4em 1.4em; }
"""


def build(workdir: Path) -> Path:
    """Writes `workdir/report/index.html` (+ PNGs and results.md) from a pipeline run folder.

    Every section whose inputs exist is shown (see the module docstring); absent inputs are
    listed on the page. Returns the path of index.html.

    Raises:
      ValueError: `workdir` is not a folder, or one of its files is malformed (named).
    """
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise ValueError(f"report: {workdir} is not a folder")
    run = _load_run(workdir)
    run.out.mkdir(exist_ok=True)
    sections = [s for s in (section(run) for section in SECTIONS) if s is not None]
    missing = ""
    if run.missing:
        items = "".join(f"<li>{html.escape(note)}</li>" for note in run.missing)
        missing = f"<div class=\"missing\" id=\"missing\"><h2>Not in this run</h2><ul>{items}" \
                  "</ul></div>"
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>alchemist_jax report: {html.escape(workdir.name)}</title>"
            f"<style>{STYLE}</style></head><body>"
            f"<h1>alchemist_jax report</h1><p>Run folder <code>{html.escape(str(workdir))}"
            f"</code></p>{missing}{''.join(sections)}</body></html>\n")
    path = run.out / "index.html"
    atomic_write_bytes(path, page.encode())
    return path


def _section(title: str, body: str) -> str:
    anchor = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    return f"<section id=\"{anchor}\"><h2>{html.escape(title)}</h2>{body}</section>"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], table_id: str | None = None,
           escape: bool = True, css_class: str | None = None) -> str:
    """An HTML table (numbers right-aligned unless `css_class` is "text"); cells are escaped
    unless `escape` is False (they hold markup already)."""
    cell = html.escape if escape else str
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    attribute = (f" id=\"{table_id}\"" if table_id else "") + (
        f" class=\"{css_class}\"" if css_class else "")
    return f"<table{attribute}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(filename: str) -> str:
    name = html.escape(filename)
    return f"<a href=\"{name}\"><img src=\"{name}\" alt=\"{name}\"></a>"


def _read_selection(path: Path) -> np.ndarray:
    return _unique_ids(_read_parquet(path, ("id",)).column("id").to_numpy(), path)


def _kind_order(kinds: np.ndarray) -> list[str]:
    """CLEAN first, then the defect kinds present in the configured order."""
    present = set(kinds.tolist())
    known = [CLEAN, *config_lib.DEFECT_KINDS]
    return [k for k in known if k in present] + sorted(present - set(known))


def _kind_colour(kind: str):
    """A fixed colour per kind: clean blue, each defect kind its own tab10 colour."""
    import matplotlib

    palette = matplotlib.colormaps["tab10"]
    if kind == CLEAN:
        return palette(0)
    kinds = config_lib.DEFECT_KINDS
    return palette(1 + kinds.index(kind)) if kind in kinds else palette(7)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    atomic_save_figure(path, fig, dpi=100)
