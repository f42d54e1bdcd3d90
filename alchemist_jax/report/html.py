"""The report page: one section per part of the run folder, the page around them and `build`.

Each section returns its HTML, or None (and a note in run.missing) when its inputs are absent.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from alchemist_jax.report import analysis, figures
from alchemist_jax.report import run_folder as folder_lib
from alchemist_jax.report.results_table import result_blocks, results_table_markdown
from alchemist_jax.report.run_folder import RunFolder
from alchemist_jax.runtime.io import atomic_write_bytes, read_json


def _config_section(run: RunFolder) -> str | None:
    if run.cfg is None:
        return None
    cfg = run.cfg
    corrupt = cfg.data.corrupt
    pool_size = len(run.pool) if run.pool is not None else "unknown (pool not opened)"
    rate = (
        f"{cfg.rate.mode}, {cfg.rate.steps} meta-steps (K={cfg.rate.inner_steps}, "
        f"population {cfg.rate.population})"
    )
    facts = [
        ("source", cfg.data.source),
        ("pool size", pool_size),
        (
            "defect fraction",
            f"{corrupt.fraction:g}"
            + (f" ({', '.join(corrupt.kinds)}; seed {corrupt.seed})" if corrupt.fraction else ""),
        ),
        ("model preset", cfg.model.preset),
        ("rating", rate),
        ("arms", ", ".join(cfg.pipeline.arms)),
        ("keep", f"{cfg.pipeline.keep:g}"),
        (
            "budget",
            f"{cfg.pipeline.budget} ({cfg.train.steps} training steps at batch "
            f"{cfg.train.batch_size})",
        ),
        ("seeds", ", ".join(map(str, cfg.pipeline.seeds))),
    ]
    if "release" in cfg.pipeline.arms:
        facts.insert(
            5,
            (
                "penalty rater (release)",
                f"{cfg.pipeline.penalty_steps or cfg.rate.steps} meta-steps",
            ),
        )
    return _section(
        "Configuration",
        _table(
            ["setting", "value"], [[name, str(value)] for name, value in facts], css_class="text"
        ),
    )


def _ratings_section(run: RunFolder) -> str | None:
    if not run.ratings:
        return None
    figures.ratings_figure(run, run.out / "ratings.png")
    caption = (
        "Stacked by defect kind (defects.parquet)."
        if run.defects is not None
        else "No defect truth: one colour."
    )
    return _section("Ratings", f"<p>{caption}</p>" + _figure("ratings.png"))


def _auroc_section(run: RunFolder) -> str | None:
    if run.defects is None or not run.ratings:
        return None
    if set(run.defects.values()) == {folder_lib.CLEAN}:
        run.missing.append("defects.parquet lists no defective sample: no AUROC table")
        return None
    table = analysis.rater_aurocs(run)
    columns = ["all", *sorted({kind for result in table.values() for kind in result} - {"all"})]
    rows = [
        [name, *(f"{result[c]:.3f}" if c in result else "n/a" for c in columns)]
        for name, result in table.items()
    ]
    within = (
        "within caption class" if run.classes is not None else "globally (caption classes unknown)"
    )
    text = (
        f"<p>AUROC of clean (positive) against each defect kind, scores z-scored {within}; "
        "0.5 is chance, 1 a perfect separation.</p>"
    )
    return _section(
        "Rater AUROC by defect kind", text + _table(["rater", *columns], rows, table_id="auroc")
    )


def _samples_section(run: RunFolder) -> str | None:
    if run.pool is None or not run.ratings:
        return None
    from alchemist_jax.data import summary

    name = "exact" if "exact" in run.ratings else next(iter(run.ratings))
    sheets = analysis.rating_sheets(run, name)
    pruned_text = ""
    if sheets.pruned is not None:
        shown, total = sheets.pruned
        pruned_text = (
            f" Pruned: a random {shown} of the {total} pool samples that "
            "selections/alchemist.parquet prunes by its score (collapsed duplicates, and samples "
            "ranked below every kept one of their ranking group; not the losers of a random fill)."
        )
    scale = "z-score within caption class" if run.classes is not None else "z-score"
    parts = [
        f"<p>Ranked by <code>{html.escape(name)}</code> ({scale}); each label shows id, "
        f"caption, defect kind when known and z.{html.escape(pruned_text)}</p>"
    ]
    for title, chosen in tqdm(sheets.sheets, desc="contact sheets", leave=False):
        filename = f"samples_{title}.png"
        summary.contact_sheet_of(
            run.pool,
            [sheets.position[int(i)] for i in chosen],
            run.out / filename,
            # The pruned sheet is the headline selection's (selections/alchemist.parquet).
            title="pruned by the alchemist selection's score"
            if title == "pruned"
            else f"{title} samples by {name}",
            notes=[sheets.notes[int(i)] for i in chosen],
        )
        parts.append(f"<h3>{title}</h3>" + _figure(filename))
    return _section("Samples by rating", "".join(parts))


def _selections_section(run: RunFolder) -> str | None:
    summaries = folder_lib.read_summaries(run)
    selections = folder_lib.read_selections(run)
    if not summaries and not selections:
        run.missing.append("selections/: no selections")
        return None
    parts = []
    if summaries:
        keys = ("policy", "keep", "count", "pool_size", "group_by")
        parts.append(
            _table(
                ["arm", *keys],
                [[arm, *(str(s.get(k, "")) for k in keys)] for arm, s in summaries],
                table_id="selections",
            )
        )
    histograms = [(arm, s["rank_histogram"]) for arm, s in summaries if "rank_histogram" in s]
    if histograms:
        figures.rank_histograms_figure(histograms, run.out / "rank_histograms.png")
        parts.append(
            "<p>Rank percentile of the chosen samples under the arm's ratings.</p>"
            + _figure("rank_histograms.png")
        )
    if selections and run.defects is not None:
        header, rows = analysis.kept_fractions(run, selections)
        parts.append(
            "<p>Fraction of each kind of pool sample that the arm keeps.</p>"
            + _table(header, rows, table_id="kept")
        )
    return _section("Selections", "".join(parts))


def _clusters_section(run: RunFolder) -> str | None:
    """The ranking clusters of the headline selection (`alchemist`, else the first summary
    with clusters) and the fusion weights every arm used."""
    summaries = [(arm, s) for arm, s in folder_lib.read_summaries(run) if s.get("clusters")]
    if not summaries:
        run.missing.append("selections/*.json: no ranking clusters")
        return None
    header, rows = cluster_rows(dict(summaries))
    arm, summary = next(((a, s) for a, s in summaries if a == "alchemist"), summaries[0])
    files = list(summary.get("ratings", []))
    clusters = summary["clusters"]
    body = []
    for cluster in clusters:
        offsets = cluster.get("offsets", {})
        cells = [
            f"{offsets[f]['mean']:+.2f} / {offsets[f]['removed']:+.2f}" if f in offsets else ""
            for f in files
        ]
        examples = "; ".join(
            f"{e['id']}{'' if e['kept'] else ' (pruned)'}: {e['caption'] or ''}"
            for e in cluster.get("examples", [])
        )
        body.append(
            [
                cluster["name"],
                str(cluster["size"]),
                str(cluster["kept"]),
                f"{cluster['keep_rate']:.2f}",
                *cells,
                examples,
            ]
        )
    text = (
        f"<p>Ranking clusters of <code>{html.escape(arm)}</code> (grouping "
        f"<code>{html.escape(str(summary.get('group_by')))}</code>, ranking "
        f"<code>{html.escape(str(summary.get('ranking', 'within')))}</code>), largest first. "
        "Offset: the cluster's mean score minus the median of the cluster means / the part "
        "removed as style (robust z units). Members: the best, middle and worst by the ranked "
        "score.</p>"
    )
    offset_header = [f"offset {Path(f).stem}" for f in files]
    return _section(
        "Clusters and fusion weights",
        "<p>Weights of each ratings file in the fused score, and each file's label-free "
        "reliability when the weights were estimated.</p>"
        + _table(header, rows, table_id="fusion-weights")
        + text
        + _table(
            ["cluster", "size", "kept", "keep rate", *offset_header, "members"],
            body,
            table_id="clusters",
        ),
    )


def cluster_rows(summaries: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the fusion weights: per arm, its ranking, clusters, and per ratings file
    its weight and reliability ("n/a" when the weights were given or equal)."""
    header = ["arm", "ranking", "clusters", "ratings file", "weight", "reliability"]
    rows = []
    for arm, summary in summaries.items():
        reliability = summary.get("reliability") or {}
        for name, weight in zip(summary.get("ratings", []), summary.get("weights", [])):
            rows.append(
                [
                    arm,
                    str(summary.get("ranking", "within")),
                    str(len(summary.get("clusters", []))),
                    name,
                    f"{weight:.3f}",
                    f"{reliability[name]:.3f}" if name in reliability else "n/a",
                ]
            )
    return header, rows


def _curves_section(run: RunFolder) -> str | None:
    curves = folder_lib.val_loss_curves(run)
    if not curves:
        run.missing.append("train/*/seed*/metrics.jsonl: no validation-loss curves")
        return None
    figures.val_loss_figure(curves, run.out / "val_loss.png")
    return _section(
        "Validation loss",
        "<p>Thin lines: seeds; thick: their mean at the steps "
        "all seeds logged; dashed: equal-epochs runs.</p>" + _figure("val_loss.png"),
    )


def _results_section(run: RunFolder) -> str | None:
    path = run.workdir / "results.json"
    if not path.exists():
        run.missing.append("results.json: no final results table")
        return None
    rows = folder_lib.read_results(path)
    atomic_write_bytes(run.out / "results.md", results_table_markdown(rows).encode())
    parts = [
        "<p>Mean ± sample std (ddof=1) over seeds; a single seed shows the mean; best "
        'of each column in bold. Also in <a href="results.md">results.md</a>.</p>'
    ]
    for budget, header, body in result_blocks(rows):
        cells = [
            [f"<b>{html.escape(t)}</b>" if bold else html.escape(t) for t, bold in line]
            for line in body
        ]
        parts.append(
            f"<h3>equal {budget}</h3>"
            + _table(header, cells, table_id=f"results-{budget}", escape=False)
        )
    return _section("Results", "".join(parts))


def _components_section(run: RunFolder) -> str | None:
    folder = run.workdir / "selections"
    summaries = {
        arm: read_json(folder / f"{arm}.json")
        for arm in analysis.COMPONENT_ARMS
        if (folder / f"{arm}.json").exists()
    }
    if len(summaries) < 2:
        run.missing.append(
            f"selections/ holds fewer than two of the arms "
            f"{', '.join(analysis.COMPONENT_ARMS)}: no table of component "
            "contributions"
        )
        return None
    for arm, summary in summaries.items():
        if not isinstance(summary, dict) or "ratings" not in summary:
            raise ValueError(f"{folder / arm}.json: no 'ratings' (the files the arm ranked by)")
    results_path = run.workdir / "results.json"
    rows = read_json(results_path) if results_path.exists() else []
    header, body = analysis.component_table(run, summaries, rows)
    text = (
        "<p>Each arm adds one component of the method: the meta-learned rater alone, then "
        "the alignment scorer fused with it (rank percentiles within clusters, "
        "<code>select.weights</code>), then duplicates collapsed before the budget (each "
        "dedup group keeps its best-scored member). Test loss and FCD: mean ± sample std "
        "over seeds at equal steps. AUROC (clean against each defect kind, z-scored within "
        "caption class) of the score the arm's selection ranks by, with collapsed "
        "duplicates below every other sample; an exact copy kept in place of its collapsed "
        "source counts as clean and the source as the duplicate (the two are the same "
        "image and caption).</p>"
    )
    return _section("Component contributions", text + _table(header, body, table_id="components"))


def _figures_section(run: RunFolder) -> str | None:
    parts = []
    for title, pattern, copies in folder_lib.figure_files(run):
        if not copies:
            run.missing.append(f"{pattern}: no {title.lower()}")
            continue
        shown = []
        for source, filename in copies:
            atomic_write_bytes(run.out / filename, source.read_bytes())
            shown.append(
                f'<figure class="thumb">{_figure(filename)}<figcaption>'
                f"{html.escape(run.relative(source))}</figcaption></figure>"
            )
        parts.append(f'<h3>{title}</h3><div class="thumbs">{"".join(shown)}</div>')
    if not parts:
        return None
    return _section("Rating curves and generated samples", "".join(parts))


# ----------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------

SECTIONS = (
    _config_section,
    _ratings_section,
    _auroc_section,
    _samples_section,
    _selections_section,
    _clusters_section,
    _curves_section,
    _results_section,
    _components_section,
    _figures_section,
)

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

    Every section whose inputs exist is shown (see the package docstring); absent inputs are
    listed on the page. Returns the path of index.html.

    Raises:
      ValueError: `workdir` is not a folder, or one of its files is malformed (named).
    """
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise ValueError(f"report: {workdir} is not a folder")
    run = folder_lib.load_run(workdir)
    run.out.mkdir(exist_ok=True)
    sections = [s for s in (section(run) for section in SECTIONS) if s is not None]
    missing = ""
    if run.missing:
        items = "".join(f"<li>{html.escape(note)}</li>" for note in run.missing)
        missing = (
            f'<div class="missing" id="missing"><h2>Not in this run</h2><ul>{items}</ul></div>'
        )
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>alchemist_jax report: {html.escape(workdir.name)}</title>"
        f"<style>{STYLE}</style></head><body>"
        f"<h1>alchemist_jax report</h1><p>Run folder <code>{html.escape(str(workdir))}"
        f"</code></p>{missing}{''.join(sections)}</body></html>\n"
    )
    path = run.out / "index.html"
    atomic_write_bytes(path, page.encode())
    return path


def _section(title: str, body: str) -> str:
    anchor = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


def _table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    table_id: str | None = None,
    escape: bool = True,
    css_class: str | None = None,
) -> str:
    """An HTML table (numbers right-aligned unless `css_class` is "text"); cells are escaped
    unless `escape` is False (they hold markup already)."""
    cell = html.escape if escape else str
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    attribute = (f' id="{table_id}"' if table_id else "") + (
        f' class="{css_class}"' if css_class else ""
    )
    return f"<table{attribute}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(filename: str) -> str:
    name = html.escape(filename)
    return f'<a href="{name}"><img src="{name}" alt="{name}"></a>'
