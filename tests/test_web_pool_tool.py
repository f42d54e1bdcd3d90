"""`tools/make_web_pool.py`: a pool it builds goes through `alchemist-jax select` as a manifest,
and `measure` reports the exact expected clean precision of a ranking whose answer is known."""

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).parent.parent


def _tool(*arguments: str) -> str:
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "tools/make_web_pool.py", *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def test_measure_reports_the_exact_expectation_of_a_perfect_scorer(tmp_path):
    pool = tmp_path / "web"
    _tool("build", "--out", str(pool), "--size", "200", "--validation-size", "20",
          "--test-size", "10", "--seed", "0")  # fmt: skip
    truth = pq.read_table(pool / "truth.parquet").to_pydict()
    assert sum(truth["defective"]) == 60  # 30% of 200: five kinds of 12
    # A perfect scorer: clean 1, defective 0. The default filter policy (keep 0.5, drop 0.25)
    # drops 50 defective samples and draws 100 of the other 150 (140 clean) uniformly, so the
    # expected clean share is 140/150 and every clean sample is kept with probability 100/150.
    ratings = tmp_path / "perfect.parquet"
    scores = [0.0 if bad else 1.0 for bad in truth["defective"]]
    pq.write_table(pa.table({"id": truth["id"], "score": scores}), ratings)
    table = _tool(
        "measure", "--truth", str(pool / "truth.parquet"), "--ratings", str(ratings),
        "--out", str(tmp_path / "sel"), "--rankings", "global", "--",
        f"data.source={pool / 'pool.parquet'}",
        f"data.validation_source={pool / 'validation.parquet'}",
        "data.manifest.id_column=id", "data.corrupt.fraction=0",
    )  # fmt: skip
    header, _, row = [line for line in table.splitlines() if line.startswith("|")]
    values = dict(zip(header.strip("|").split("|"), row.strip("|").split("|")))
    values = {name.strip(): value.strip() for name, value in values.items()}
    assert values["ranking"] == "global"
    assert float(values["expected"]) == pytest.approx(140 / 150, abs=5e-5)
    assert float(values["kept clean"]) == pytest.approx(100 / 150, abs=5e-4)
    drawn = float(values["clean precision"])  # one draw of 100: a whole number of percent
    assert 0.9 <= drawn <= 1.0 and round(drawn * 100, 6) == round(drawn * 100)
    selected = pq.read_table(tmp_path / "sel" / "global.parquet").column("id").to_pylist()
    assert len(selected) == 100 and set(selected) <= set(truth["id"])
