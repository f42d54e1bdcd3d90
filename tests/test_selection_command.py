"""The `select` command (`selection.command`): ratings and dedup files joined on the pool, errors
naming the file, the written selection and its recipe, and the command line end to end."""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alchemist_jax import cli, selection
from alchemist_jax.config import SelectConfig, load_config
from alchemist_jax.data import load_splits
from alchemist_jax.data.sources import ArraySource


def test_collapse_before_the_budget_on_a_pool():
    # Ten samples in two labels, two scorers that agree, three copies of one sample (ids 0, 5, 7)
    # and a pair (ids 2, 3). Only the best copy competes, and the budget is 5 of all 10.
    source = ArraySource("p", np.arange(10), None, None, labels=np.array([0] * 5 + [1] * 5))
    first = np.array([9.0, 1.0, 8.0, 7.0, 2.0, 8.5, 3.0, 8.8, 4.0, 5.0])
    ratings = {
        "a.parquet": (np.arange(10), first),
        "b.parquet": (np.arange(10)[::-1], first[::-1] * 100),
    }
    duplicates = ("dedup.parquet", (np.arange(10), np.array([0, 1, 2, 2, 4, 0, 6, 0, 8, 9])))
    config = SelectConfig(policy="topk", keep=0.5, ranking="within", fusion="equal")
    chosen, summary = selection.select_for_source(config, ratings, source, duplicates=duplicates)
    # Both files rank alike, so fused = the within-label percentile of `first`:
    #   label 0, ids 0-4: 1, 0, 3/4, 1/2, 1/4;  label 1, ids 5-9: 3/4, 0, 1, 1/4, 1/2.
    # Copies 0, 5, 7 score 1, 3/4, 1: the tie of 0 and 7 goes to id 0; of 2 and 3, 2 stays.
    # Eligible: 0, 1, 2, 4 (label 0) and 6, 8, 9 (label 1); shares of 5 by 4 and 3: 3 and 2.
    assert summary["duplicates_collapsed"] == 3
    assert chosen.tolist() == [0, 2, 4, 8, 9]
    assert summary["ratings"] == ["a.parquet", "b.parquet"] and summary["weights"] == [1.0, 1.0]
    assert summary["dedup"] == "dedup.parquet" and summary["count"] == 5
    without, _ = selection.select_for_source(config, ratings, source)
    assert without.tolist() == [0, 2, 3, 5, 7]


def test_mismatched_ids_and_weights_name_the_file():
    source = ArraySource("p", np.arange(10, 20), None, None, labels=np.zeros(10, np.int64))
    good = (np.arange(10, 20), np.arange(10.0))
    config = SelectConfig(keep=0.5)
    for ids, message in [
        (np.arange(11, 20), "b.parquet: 1 pool ids are missing (e.g. id 10)"),
        (np.arange(11, 21), "b.parquet: 1 of its ids are not in the pool (e.g. id 20)"),
    ]:
        with pytest.raises(ValueError, match=re.escape(f"ratings file {message}")):
            selection.select_for_source(
                config, {"a.parquet": good, "b.parquet": (ids, np.zeros(len(ids)))}, source
            )
        with pytest.raises(ValueError, match=re.escape(f"dedup file {message}")):
            selection.select_for_source(
                config, {"a.parquet": good}, source, duplicates=("b.parquet", (ids, ids))
            )
    with pytest.raises(
        ValueError,
        match=re.escape("select.weights has 3 values for 2 ratings files (a.parquet, b.parquet)"),
    ):
        selection.select_for_source(
            SelectConfig(weights=(1.0, 2.0, 3.0)), {"a.parquet": good, "b.parquet": good}, source
        )


TINY = [
    "data.pool.train_size=200",
    "data.pool.validation_size=20",
    "data.pool.test_size=20",
    "select.keep=0.3",
    "select.ranking=within",
]


def _write_ratings(path, ids, scores):
    pq.write_table(
        pa.table({"id": pa.array(ids, pa.int64()), "score": pa.array(scores, pa.float32())}), path
    )


def test_run_end_to_end_and_bad_ratings(tmp_path, capsys):
    cfg = load_config("configs/demo.yaml", TINY)
    pool = load_splits(cfg.data).train
    pool_ids = pool.ids
    rng = np.random.default_rng(0)
    order = rng.permutation(len(pool_ids))
    ratings, out = tmp_path / "ratings.parquet", tmp_path / "sel" / "alchemist.parquet"
    _write_ratings(ratings, pool_ids[order], rng.normal(size=len(pool_ids)))
    summary = selection.run(cfg, ratings, out)
    table = pq.read_table(out)
    chosen = table.column("id").to_numpy()
    assert table.schema.field("id").type == pa.int64()
    assert len(chosen) == 60 and np.isin(chosen, pool_ids).all()
    recipe = json.loads(table.schema.metadata[selection.PARQUET_METADATA_KEY])
    assert recipe == {
        "policy": "filter",
        "keep": 0.3,
        "group_by": "label",
        "kmeans": None,
        "ranking": "within",
        "params": {"drop": 0.25, "seed": 0},
        "ratings": [str(ratings)],
        "weights": [1.0],
        "dedup": None,
    }
    written = json.loads(out.with_suffix(".json").read_text())
    assert written == summary and written["count"] == 60 and written["pool_size"] == 200
    assert len(written["cluster_keep_rates"]) == 20
    assert sum(written["rank_histogram"]["counts"]) == 60
    sizes = np.bincount(pool.labels)
    shares = selection.allocate(60, sizes)
    assert written["cluster_keep_rates"] == pytest.approx(
        {f"label {label}": shares[label] / sizes[label] for label in range(20)}
    )
    assert (
        "selected 60 of 200 samples (filter, keep 0.3, 1 ratings file) in 20 clusters by label"
    ) in capsys.readouterr().out

    # The command line runs the same function (--policy / --keep are config shortcuts).
    assert (
        cli.main(
            [
                "select",
                "--config",
                "configs/demo.yaml",
                *TINY,
                "--ratings",
                str(ratings),
                "--out",
                str(tmp_path / "top.parquet"),
                "--policy",
                "topk",
                "--keep",
                "0.25",
            ]
        )
        == 0
    )
    assert pq.read_table(tmp_path / "top.parquet").num_rows == 50

    bad = tmp_path / "bad.parquet"
    for ids, scores, message in [
        (pool_ids[1:], np.zeros(199), f"1 pool ids are missing (e.g. id {pool_ids[0]})"),
        (
            np.r_[pool_ids, 10**9],
            np.zeros(201),
            "1 of its ids are not in the pool (e.g. id 1000000000)",
        ),
        (np.r_[pool_ids, pool_ids[0]], np.zeros(201), f"id {pool_ids[0]} appears 2 times"),
        (pool_ids, np.r_[np.nan, np.zeros(199)], "1 scores are NaN"),
    ]:
        _write_ratings(bad, ids, scores)
        with pytest.raises(ValueError, match=re.escape(f"ratings file {bad}: {message}")):
            selection.run(cfg, bad, tmp_path / "x.parquet")
    pq.write_table(pa.table({"id": pool_ids, "rating": np.zeros(200)}), bad)
    with pytest.raises(ValueError, match=re.escape(f"ratings file {bad} has no column 'score'")):
        selection.run(cfg, bad, tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()


def test_select_for_source_matches_select():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=60)
    ids = rng.permutation(600)[:60].astype(np.int64)
    source = ArraySource(
        "s", np.sort(ids), None, ["a cat", "a dog", "a car"] * 20, labels=np.sort(ids) % 4
    )
    config = SelectConfig(policy="shift_gsample", keep=0.4, seed=5, ranking="within")
    chosen, summary = selection.select_for_source(config, {"r.parquet": (ids, scores)}, source)
    expected = selection.select(
        scores,
        ids,
        policy="shift_gsample",
        keep=0.4,
        seed=5,
        groups=ids % 4,
        head=0.25,
        mu=0.54,
        sigma=0.25,
    )
    np.testing.assert_array_equal(chosen, expected)
    assert summary["params"] == {"head": 0.25, "mu": 0.54, "sigma": 0.25, "seed": 5}
    assert summary["group_by"] == "label" and summary["policy"] == "shift_gsample"


def test_command_fuses_files_collapses_duplicates_and_records_its_inputs(tmp_path, capsys):
    cfg = load_config("configs/demo.yaml", TINY + ["select.weights=[2.0, 1.0]"])
    pool = load_splits(cfg.data).train
    pool_ids, labels = pool.ids, pool.labels
    rng = np.random.default_rng(0)
    first, second = rng.normal(size=(2, 200))
    paths = [tmp_path / "meta.parquet", tmp_path / "alignment.parquet"]
    _write_ratings(paths[0], pool_ids, first)
    order = rng.permutation(200)
    _write_ratings(paths[1], pool_ids[order], second[order])  # rows in another order
    duplicate_groups = np.r_[np.arange(40) // 2, 20 + np.arange(160)]  # 20 pairs
    dedup = tmp_path / "dedup.parquet"
    pq.write_table(
        pa.table(
            {
                "id": pa.array(pool_ids, pa.int64()),
                "group": pa.array(duplicate_groups, pa.int64()),
                "group_size": pa.array(np.bincount(duplicate_groups)[duplicate_groups], pa.int32()),
            }
        ),
        dedup,
    )
    out = tmp_path / "fused.parquet"
    # Overrides may follow the ratings files.
    assert (
        cli.main(
            [
                "select",
                "--config",
                "configs/demo.yaml",
                *TINY,
                "--ratings",
                *map(str, paths),
                "select.weights=[2.0,1.0]",
                "--dedup",
                str(dedup),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    chosen = pq.read_table(out).column("id").to_numpy()
    fused = np.exp(
        (
            2 * np.log(selection.rank_normalize(first.astype(np.float32), labels))
            + np.log(selection.rank_normalize(second.astype(np.float32), labels))
        )
        / 3
    )
    eligible = selection.best_of_duplicates(fused, pool_ids, duplicate_groups)
    expected = selection.select(
        fused,
        pool_ids,
        policy="filter",
        keep=0.3,
        seed=0,
        groups=labels,
        eligible=eligible,
        drop=0.25,
    )
    np.testing.assert_array_equal(chosen, expected)
    assert len(chosen) == 60 and eligible.sum() == 180
    assert np.bincount(duplicate_groups[np.isin(pool_ids, chosen)]).max() == 1
    recipe = json.loads(pq.read_schema(out).metadata[selection.PARQUET_METADATA_KEY])
    assert recipe["ratings"] == list(map(str, paths)) and recipe["weights"] == [2.0, 1.0]
    assert recipe["dedup"] == str(dedup)
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["duplicates_collapsed"] == 20
    assert (
        f"2 ratings files, given weights {paths[0].name} 0.67 / {paths[1].name} 0.33, "
        "20 duplicates collapsed"
    ) in capsys.readouterr().out

    with pytest.raises(ValueError, match=re.escape(f"ratings file {paths[0]} is given twice")):
        selection.run(cfg, [paths[0], paths[0]], tmp_path / "x.parquet")
    respelled = paths[0].parent / "." / paths[0].name  # the same file under another spelling
    with pytest.raises(ValueError, match="is given twice"):
        selection.run(cfg, [paths[0], respelled], tmp_path / "x.parquet")
    pq.write_table(pa.table({"id": pool_ids, "cluster": pool_ids}), tmp_path / "bad.parquet")
    with pytest.raises(
        ValueError,
        match=r"bad.parquet has no column 'group' \(columns: id, cluster\); write one with",
    ):
        selection.run(cfg, paths, tmp_path / "x.parquet", dedup=tmp_path / "bad.parquet")
    # Null or fractional duplicate groups are refused, not merged into one group or truncated.
    holes = pa.array([None] * 20 + list(range(180)), pa.int64())
    pq.write_table(pa.table({"id": pool_ids, "group": holes}), tmp_path / "nulls.parquet")
    with pytest.raises(ValueError, match="nulls.parquet: column 'group' has 20 null values"):
        selection.run(cfg, paths, tmp_path / "x.parquet", dedup=tmp_path / "nulls.parquet")
    halves = pa.array(np.arange(200) / 2, pa.float64())
    pq.write_table(pa.table({"id": pool_ids, "group": halves}), tmp_path / "halves.parquet")
    with pytest.raises(ValueError, match="halves.parquet: column 'group' has type double"):
        selection.run(cfg, paths, tmp_path / "x.parquet", dedup=tmp_path / "halves.parquet")
    # The summary's name can not take the selection's place.
    with pytest.raises(ValueError, match="the summary is written beside the selection"):
        selection.run(cfg, paths, tmp_path / "sel.json")
    assert not (tmp_path / "sel.json").exists()


def test_recipe_of_kmeans_and_weights_that_fall_back_to_equal(tmp_path, capsys):
    captions = [f"{'a cat on a mat' if n % 2 else 'a dog in a park'} {n}" for n in range(60)]
    ids = np.arange(60)
    source = ArraySource("web", ids, None, captions)
    config = SelectConfig(group_by="kmeans", clusters=3, min_cluster_size=5, keep=0.5)
    _, summary = selection.select_for_source(config, {"r": (ids, ids * 1.0)}, source)
    assert summary["group_by"] == "kmeans"
    assert summary["kmeans"] == {"clusters": 3, "min_cluster_size": 5}
    # Two files of constant scores: no reliability anywhere, so equal weights, said as such.
    cfg = load_config("configs/demo.yaml", TINY)
    pool_ids = load_splits(cfg.data).train.ids
    paths = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    for path in paths:
        _write_ratings(path, pool_ids, np.ones(len(pool_ids)))
    summary = selection.run(cfg, paths, tmp_path / "sel.parquet")
    assert summary["reliability"] == {str(paths[0]): 0.0, str(paths[1]): 0.0}
    assert (
        "equal (no scorer separates a low tail) weights a.parquet 0.50 / b.parquet 0.50"
        in capsys.readouterr().out
    )
