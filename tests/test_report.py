"""The report of a run folder: links that resolve, AUROC and results numbers against references,
a partial folder that still builds, and (with Chromium) a rendered, non-blank page."""

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from alchemist_jax import config as config_lib
from alchemist_jax import data, report
from alchemist_jax.evaluation.defects import defect_auroc

REPO = Path(__file__).resolve().parents[1]
METRIC_NAMES = ("test_loss", "fcd", "alignment")


class _Page(HTMLParser):
    """Collects img src / a href, and the text of every cell of every table with an id."""

    def __init__(self, text: str):
        super().__init__()
        self.links, self.tables, self._table, self._row, self._cell = [], {}, None, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.links.append(attrs["src"])
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "table" and "id" in attrs:
            self._table = self.tables.setdefault(attrs["id"], [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "table":
            self._table = self._row = None

    def handle_data(self, text):
        if self._cell is not None:
            self._cell += text


def _write_png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _write_config(workdir: Path, overrides: list[str]) -> config_lib.Config:
    """config.yaml as the pipeline writes it (yaml of config.to_dict)."""
    cfg = config_lib.load_config(
        REPO / "configs/demo.yaml", ["data.pool.train_size=200", *overrides]
    )
    workdir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(json.loads(json.dumps(config_lib.to_dict(cfg))), sort_keys=False)
    (workdir / "config.yaml").write_text(text)
    return cfg


def _write_ratings(workdir: Path, ids: np.ndarray, clean: np.ndarray) -> dict[str, np.ndarray]:
    """Two raters scoring clean samples higher, rows shuffled (the report joins on id)."""
    rng = np.random.default_rng(1)
    ratings = {}
    for name, separation in (("exact", 1.5), ("penalty", 0.3)):
        scores = (rng.normal(size=len(ids)) + separation * clean).astype(np.float32)
        order = rng.permutation(len(ids))
        (workdir / "ratings").mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.table({"id": ids[order], "score": scores[order]}),
            workdir / "ratings" / f"{name}.parquet",
        )
        ratings[name] = scores
    return ratings


def _results_rows() -> list[dict]:
    rng = np.random.default_rng(2)
    rows = []
    for arm, run, budget, steps in (
        ("alchemist", "alchemist", "steps", 50),
        ("random", "random", "steps", 50),
        ("alchemist", "alchemist-epochs", "epochs", 25),
    ):
        for seed in (0, 1):
            rows.append(
                {
                    "arm": arm,
                    "run": run,
                    "budget": budget,
                    "seed": seed,
                    "steps": steps,
                    "train_size": 100,
                    "test_loss": float(rng.uniform(0.3, 0.5)),
                    "fcd": float(rng.uniform(5, 20)),
                    "alignment": float(rng.uniform()),
                }
            )
    return rows


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A complete, tiny pipeline run folder following the documented layout."""
    workdir = tmp_path_factory.mktemp("run")
    cfg = _write_config(workdir, ["pipeline.seeds=[0, 1]", "data.corrupt.fraction=0.3"])
    splits = data.load_splits(cfg.data)
    pq.write_table(splits.truth, workdir / "defects.parquet")
    ids = splits.truth.column("id").to_numpy()
    clean = np.array([d is None for d in splits.defects])
    ratings = _write_ratings(workdir, ids, clean)

    (workdir / "selections").mkdir()
    order = np.argsort(-ratings["exact"])
    chosen = {
        "alchemist": np.sort(ids[order[:100]]),
        "random": np.sort(np.random.default_rng(3).choice(ids, 100, replace=False)),
    }
    for arm, arm_ids in chosen.items():
        pq.write_table(pa.table({"id": arm_ids}), workdir / "selections" / f"{arm}.parquet")
        summary = {
            "arm": arm,
            "policy": "filter" if arm == "alchemist" else "random",
            "keep": 0.5,
            "count": 100,
            "pool_size": 200,
            "group_by": "label",
            "params": {},
        }
        if arm == "alchemist":
            summary["ratings"] = ["ratings/exact.parquet"]
            summary["rank_histogram"] = {
                "edges": np.linspace(0, 1, 11).tolist(),
                "counts": [20, 20, 20, 20, 20, 0, 0, 0, 0, 0],
            }
        (workdir / "selections" / f"{arm}.json").write_text(json.dumps(summary))

    for run in ("alchemist", "random"):
        for seed in (0, 1):
            lines = []
            for step in range(10, 60, 10):
                lines.append({"step": step, "train_loss": 1.0 / step})
                lines.append(
                    {"step": step, "val_loss": 1.0 / step + 0.01 * seed + 0.02 * (run == "random")}
                )
            folder = workdir / "train" / run / f"seed{seed}"
            folder.mkdir(parents=True)
            (folder / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
            eval_dir = workdir / "eval" / run / f"seed{seed}"
            eval_dir.mkdir(parents=True)
            (eval_dir / "metrics.json").write_text(json.dumps({"test_loss": 0.4}))
            _write_png(eval_dir / "samples.png", seed)
    _write_png(workdir / "rate" / "exact" / "curves.png", 7)
    rows = _results_rows()
    (workdir / "results.json").write_text(json.dumps(rows))
    return workdir, splits, ratings, rows


@pytest.fixture(scope="module")
def built(run_folder):
    workdir = run_folder[0]
    index = report.build(workdir)
    return index, _Page(index.read_text())


def test_report_links_only_existing_local_files(run_folder, built):
    index, page = built
    assert index == run_folder[0] / "report" / "index.html"
    assert len(page.links) >= 10
    for link in page.links:
        assert "://" not in link and not link.startswith("/"), link
        assert (index.parent / link).is_file(), link
    # Every section's figure was made, the copies are byte-identical to their sources.
    for name in (
        "ratings.png",
        "rank_histograms.png",
        "val_loss.png",
        "samples_top.png",
        "samples_middle.png",
        "samples_bottom.png",
        "samples_pruned.png",
        "rate_exact_curves.png",
        "eval_random_seed1.png",
        "results.md",
    ):
        assert name in page.links, name
    assert (index.parent / "eval_random_seed1.png").read_bytes() == (
        run_folder[0] / "eval/random/seed1/samples.png"
    ).read_bytes()
    sheet = np.asarray(Image.open(index.parent / "samples_top.png").convert("L"))
    assert sheet.std() > 20


def test_auroc_cells_match_defect_auroc(run_folder, built):
    _, splits, ratings, _ = run_folder
    table = built[1].tables["auroc"]
    header, body = table[0], {row[0]: row for row in table[1:]}
    assert header[:2] == ["rater", "all"] and len(header) == 2 + 6  # six defect kinds
    assert list(body) == ["exact", "penalty"]
    for name, scores in ratings.items():
        expected = defect_auroc(scores, splits.defects, splits.caption_classes)
        cells = dict(zip(header[1:], body[name][1:]))
        assert set(cells) == set(expected)
        for kind, value in expected.items():
            assert float(cells[kind]) == pytest.approx(value, abs=5e-4), (name, kind)
    # The better-separating rater is ahead overall (1.5 vs 0.3 standard deviations).
    assert float(body["exact"][1]) > 0.8 > float(body["penalty"][1])


def test_kept_fraction_per_defect_kind(run_folder, built):
    workdir, splits, _, _ = run_folder
    table = built[1].tables["kept"]
    kind_of = dict(
        zip(splits.truth.column("id").to_pylist(), (d or "clean" for d in splits.defects))
    )
    for row in table[1:]:
        kept = pq.read_table(workdir / "selections" / f"{row[0]}.parquet").column("id").to_pylist()
        assert row[1] == "100"
        for kind, cell in zip(table[0][2:], row[2:]):
            total = sum(k == kind for k in kind_of.values())
            assert float(cell) == pytest.approx(
                sum(kind_of[i] == kind for i in kept) / total, abs=5e-3
            ), (row[0], kind)


def test_results_table_is_mean_and_sample_std(run_folder, built):
    workdir, _, _, rows = run_folder
    tables = built[1].tables
    markdown = (workdir / "report" / "results.md").read_text()
    for budget, runs in (("steps", ["alchemist", "random"]), ("epochs", ["alchemist-epochs"])):
        table = tables[f"results-{budget}"]
        assert [row[0] for row in table[1:]] == runs
        for line in table[1:]:
            seeds = [r for r in rows if r["run"] == line[0]]
            assert line[1:4] == ["2", str(seeds[0]["steps"]), "100"]
            for cell, metric in zip(line[4:], METRIC_NAMES):
                values = np.array([r[metric] for r in seeds])
                mean, std = (float(x) for x in cell.split(" ± "))
                assert mean == pytest.approx(values.mean(), abs=5e-5)
                assert std == pytest.approx(values.std(ddof=1), abs=5e-5)
                assert cell in markdown
    # Bold marks the best mean: lowest test loss among the equal-steps runs.
    means = {
        run: np.mean([r["test_loss"] for r in rows if r["run"] == run])
        for run in ("alchemist", "random")
    }
    best = min(means, key=means.get)
    best_line = next(line for line in markdown.splitlines() if line.startswith(f"| {best} |"))
    assert best_line.split(" | ")[4].startswith("**")


def test_results_table_markdown_hand_computed():
    rows = [
        {
            "arm": "a",
            "run": "a",
            "budget": "steps",
            "seed": s,
            "steps": 10,
            "train_size": 5,
            "test_loss": v,
            "fcd": None,
            "alignment": 0.5,
        }
        for s, v in enumerate([1.0, 2.0, 4.0])
    ]
    rows.append(
        {
            "arm": "b",
            "run": "b",
            "budget": "steps",
            "seed": 0,
            "steps": 10,
            "train_size": 8,
            "test_loss": 3.0,
            "fcd": 7.0,
            "alignment": 0.25,
        }
    )
    text = report.results_table_markdown(rows)
    # mean 7/3, sample std sqrt(((4/3)^2 + (1/3)^2 + (5/3)^2) / 2) = sqrt(7/3) = 1.5275.
    assert "| a | 3 | 10 | 5 | **2.3333 ± 1.5275** | n/a | **0.5000 ± 0.0000** |" in text
    assert "| b | 1 | 10 | 8 | 3.0000 | **7.0000** | 0.2500 |" in text
    assert "equal epochs" not in text
    with pytest.raises(ValueError, match="row 1: run 'a' budget 'steps' seed 0 appears twice"):
        report.results_table_markdown([rows[0], rows[0]])
    with pytest.raises(ValueError, match="row 0: missing 'budget'"):
        report.results_table_markdown([{"arm": "a", "run": "a", "seed": 0}])


def test_partial_folder_builds_and_says_what_is_missing(tmp_path):
    cfg = _write_config(tmp_path, ["data.corrupt.fraction=0"])
    ids = data.load_splits(cfg.data).train.ids
    _write_ratings(tmp_path, ids, np.zeros(len(ids)))
    page_text = report.build(tmp_path).read_text()
    page = _Page(page_text)
    for link in page.links:
        assert (tmp_path / "report" / link).is_file(), link
    assert "auroc" not in page.tables and not any(t.startswith("results") for t in page.tables)
    assert "samples_top.png" in page.links and "ratings.png" in page.links
    missing = page_text[page_text.index('id="missing"') :]
    for what in (
        "defects.parquet",
        "results.json",
        "selections/",
        "train/*/seed*/metrics.jsonl",
        "selections/alchemist.parquet",
        "rate/*/curves.png",
        "eval/*/seed*/samples.png",
    ):
        assert what in missing, what
    assert not (tmp_path / "report" / "results.md").exists()


def test_malformed_ratings_name_the_file(tmp_path):
    _write_config(tmp_path, [])
    (tmp_path / "ratings").mkdir()
    pq.write_table(
        pa.table({"id": [1, 2], "value": [0.1, 0.2]}), tmp_path / "ratings" / "exact.parquet"
    )
    with pytest.raises(ValueError, match=r"exact.parquet has no column 'score'"):
        report.build(tmp_path)
    (tmp_path / "config.yaml").unlink()  # no pool to open: the checks below are quick
    pq.write_table(
        pa.table({"id": [1, 2], "score": [0.1, 0.2]}), tmp_path / "ratings" / "exact.parquet"
    )
    pq.write_table(
        pa.table({"id": [1, 2, 2], "defect": [None, "blur", "blur"]}), tmp_path / "defects.parquet"
    )
    with pytest.raises(ValueError, match=r"defects.parquet: id 2 appears 2 times"):
        report.build(tmp_path)
    pq.write_table(pa.table({"id": [1, 3], "defect": [None, "blur"]}), tmp_path / "defects.parquet")
    with pytest.raises(
        ValueError,
        match=r"ratings/exact.parquet: 1 of 2 ids are not in "
        r"defects.parquet \(first: 2\)",
    ):
        report.build(tmp_path)
    with pytest.raises(ValueError, match="is not a folder"):
        report.build(tmp_path / "absent")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_screenshot_is_not_blank(run_folder, built):
    result = subprocess.run(
        ["bash", str(REPO / "tools" / "screenshot_report.sh"), str(run_folder[0])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    shot = Path(result.stdout.strip().splitlines()[-1])
    pixels = np.asarray(Image.open(shot).convert("L"), np.float64)
    assert pixels.shape == (4000, 1280) and pixels.std() > 10


def test_component_contributions_table(tmp_path):
    """meta only / + alignment / + dedup: test loss and FCD from results.json, AUROC of the
    score each selection ranks by, recomputed here from the same files."""
    from alchemist_jax import selection

    # Within-class ranking with equal weights: the AUROC below is recomputed from those rules.
    cfg = _write_config(
        tmp_path, ["data.corrupt.fraction=0.3", "select.ranking=within", "select.fusion=equal"]
    )
    splits = data.load_splits(cfg.data)
    pq.write_table(splits.truth, tmp_path / "defects.parquet")
    ids = splits.train.ids
    kinds = np.array([d or "clean" for d in splits.defects])
    rng = np.random.default_rng(4)
    # The meta rater sees image defects, the alignment scorer caption swaps; a copy scores like
    # its source (both raters), so only the dedup file tells them apart.
    meta = rng.normal(size=len(ids)) + 2.0 * np.isin(kinds, ["clean", "caption_swap", "duplicate"])
    alignment = rng.normal(size=len(ids)) + 2.0 * (kinds != "caption_swap")
    index_of = {int(i): n for n, i in enumerate(ids)}
    duplicate_groups = ids.copy()
    for n, (kind, source) in enumerate(
        zip(splits.defects, splits.truth.column("source_id").to_pylist())
    ):
        if kind == "duplicate":
            meta[n], alignment[n] = meta[index_of[source]], alignment[index_of[source]]
            duplicate_groups[n] = source
    (tmp_path / "ratings").mkdir()
    for name, scores in (("exact", meta), ("alignment", alignment)):
        pq.write_table(
            pa.table({"id": ids, "score": scores.astype(np.float32)}),
            tmp_path / "ratings" / f"{name}.parquet",
        )
    _, inverse, sizes = np.unique(duplicate_groups, return_inverse=True, return_counts=True)
    pq.write_table(
        pa.table(
            {"id": ids, "group": duplicate_groups, "group_size": sizes[inverse].astype(np.int32)}
        ),
        tmp_path / "dedup.parquet",
    )
    rows = []
    for arm, names, collapse in (
        ("meta_only", ["exact"], False),
        ("meta_alignment", ["exact", "alignment"], False),
        ("alchemist", ["exact", "alignment"], True),
    ):
        ratings = {
            f"ratings/{n}.parquet": selection.read_ratings(tmp_path / "ratings" / f"{n}.parquet")
            for n in names
        }
        duplicates = ("dedup.parquet", (ids, duplicate_groups)) if collapse else None
        chosen, summary = selection.select_for_source(
            cfg.select, ratings, splits.train, duplicates=duplicates
        )
        selection.write_selection(
            tmp_path / "selections" / f"{arm}.parquet", chosen, {"arm": arm, **summary}
        )
        for seed, loss in enumerate((0.5, 0.7)):
            rows.append(
                {
                    "arm": arm,
                    "run": arm,
                    "budget": "steps",
                    "seed": seed,
                    "test_loss": loss + len(names) / 10,
                    "fcd": 10.0 * len(names),
                }
            )
    (tmp_path / "results.json").write_text(json.dumps(rows))

    table = _Page(report.build(tmp_path).read_text()).tables["components"]
    body = {row[0]: dict(zip(table[0], row)) for row in table[1:]}
    assert list(body) == ["meta_only", "meta_alignment", "alchemist"]
    assert [body[a]["ranks by"] for a in body] == [
        "exact",
        "exact + alignment",
        "exact + alignment + dedup",
    ]
    # mean of (0.5, 0.7) + 0.1 per file; sample std sqrt(0.02) = 0.1414.
    assert body["meta_only"]["test loss ↓"] == "0.7000 ± 0.1414"
    assert body["alchemist"]["test loss ↓"] == "0.8000 ± 0.1414"
    assert body["meta_alignment"]["FCD ↓"] == "20.0000 ± 0.0000"
    labels = splits.train.labels
    meta32, alignment32 = meta.astype(np.float32), alignment.astype(np.float32)
    fused = selection.fuse([meta32, alignment32], groups=labels)
    eligible = selection.best_of_duplicates(fused, ids, duplicate_groups)
    expected = {
        "meta_only": meta32,
        "meta_alignment": fused,
        "alchemist": np.where(
            eligible,
            fused,  # collapsed: just below the lowest
            fused.min() - 1e-6 * (fused.max() - fused.min()),
        ),
    }
    # A kept exact copy whose source was collapsed trades labels with it.
    credited = list(splits.defects)
    for n, (kind, source) in enumerate(
        zip(splits.defects, splits.truth.column("source_id").to_pylist())
    ):
        if kind == "duplicate" and eligible[n] and not eligible[index_of[source]]:
            credited[n], credited[index_of[source]] = None, "duplicate"
    for arm, scores in expected.items():
        defects = credited if arm == "alchemist" else splits.defects
        for kind, value in defect_auroc(scores, defects, splits.caption_classes).items():
            assert float(body[arm][f"AUROC {kind}" if kind == "all" else kind]) == pytest.approx(
                value, abs=5e-4
            ), (arm, kind)
    # Alignment lifts caption swaps; dedup puts every redundant member of a duplicate group
    # (a copy, or the source a kept copy replaced) below the rest.
    assert (
        float(body["meta_alignment"]["caption_swap"])
        > float(body["meta_only"]["caption_swap"]) + 0.3
    )
    assert float(body["alchemist"]["duplicate"]) > 0.95
    assert float(body["meta_alignment"]["duplicate"]) < 0.65


def test_clusters_section_shows_sizes_members_keep_rates_and_weights(tmp_path):
    """The clusters of the headline selection (size, kept, keep rate, offsets, members) and
    the fusion weights with their reliability, as the selection summary recorded them."""
    from alchemist_jax import selection

    cfg = _write_config(tmp_path, ["data.corrupt.fraction=0.3"])
    splits = data.load_splits(cfg.data)
    ids = splits.train.ids
    clean = np.array([d is None for d in splits.defects])
    rng = np.random.default_rng(5)
    ratings = {
        "ratings/good.parquet": (ids, rng.normal(size=len(ids)) + 4.0 * clean),
        "ratings/noise.parquet": (ids, rng.uniform(size=len(ids))),
    }
    chosen, summary = selection.select_for_source(cfg.select, ratings, splits.train)
    selection.write_selection(
        tmp_path / "selections" / "alchemist.parquet", chosen, {"arm": "alchemist", **summary}
    )
    page = _Page(report.build(tmp_path).read_text())
    weights = page.tables["fusion-weights"]
    assert weights[0] == ["arm", "ranking", "clusters", "ratings file", "weight", "reliability"]
    assert [row[3] for row in weights[1:]] == list(ratings)
    assert summary["ranking"] == "shrunk" and summary["reliability"]["ratings/noise.parquet"] == 0
    for row, name in zip(weights[1:], ratings):
        assert row[:3] == ["alchemist", "shrunk", "20"]
        assert float(row[4]) == pytest.approx(
            summary["weights"][list(ratings).index(name)], abs=5e-4
        )
        assert float(row[5]) == pytest.approx(summary["reliability"][name], abs=5e-4)
    table = page.tables["clusters"]
    assert table[0][:4] == ["cluster", "size", "kept", "keep rate"]
    assert len(table) == 21  # 20 caption classes of the built-in pool
    labels = splits.train.labels
    kept = np.isin(ids, chosen)
    for row in table[1:]:
        label = int(row[0].split()[-1])
        members = labels == label
        assert int(row[1]) == members.sum() and int(row[2]) == kept[members].sum()
        assert float(row[3]) == pytest.approx(kept[members].mean(), abs=5e-3)
        shown = [int(part.split(":")[0].split()[0]) for part in row[-1].split("; ")]
        assert len(shown) == 3 and all(labels[ids == i][0] == label for i in shown)
    sizes = [int(row[1]) for row in table[1:]]
    assert sizes == sorted(sizes, reverse=True)


def test_pruned_sheet_is_what_the_score_prunes_not_the_random_fill(tmp_path):
    """The report's pruned samples: the filter's dropped lowest scores (everything ranked below
    the lowest kept sample), not the samples its random fill happened to leave out."""
    from alchemist_jax import selection
    from alchemist_jax.report import analysis, run_folder

    cfg = _write_config(tmp_path, ["data.corrupt.fraction=0.3"])
    splits = data.load_splits(cfg.data)
    pq.write_table(splits.truth, tmp_path / "defects.parquet")
    ids = splits.train.ids
    clean = np.array([d is None for d in splits.defects])
    scores = np.random.default_rng(6).normal(size=len(ids)) + 4.0 * clean
    (tmp_path / "ratings").mkdir()
    pq.write_table(pa.table({"id": ids, "score": scores}), tmp_path / "ratings/exact.parquet")
    ratings = {"ratings/exact.parquet": (ids, scores)}
    chosen, summary = selection.select_for_source(cfg.select, ratings, splits.train)
    selection.write_selection(
        tmp_path / "selections" / "alchemist.parquet", chosen, {"arm": "alchemist", **summary}
    )
    run = run_folder.load_run(tmp_path)
    ranked = analysis.arm_ranking(run, "alchemist", summary)
    ascending = ranked.ids[np.argsort(ranked.scores, kind="stable")]
    first_kept = int(np.flatnonzero(np.isin(ascending, chosen))[0])
    pruned = analysis.pruned_by_score(run, "alchemist")
    # filter: round(drop * N) lowest are always dropped; the random fill prunes the rest.
    assert first_kept >= round(cfg.select.drop * len(ids))
    assert sorted(pruned.tolist()) == sorted(ascending[:first_kept].tolist())
    assert len(ids) - len(chosen) - len(pruned) >= 20  # random-fill losers, left out
    assert np.mean(np.isin(pruned, ids[~clean])) >= 0.9  # this rater prunes defects
    page = _Page(report.build(tmp_path).read_text())
    assert "samples_pruned.png" in page.links
