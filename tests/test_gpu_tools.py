"""The GPU benchmark's CPU path (what `tools/gpu_check.sh --cpu` runs), in bf16 compute: every
row of its table is measured and logged."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_bench_gpu_cpu_path_prints_and_logs_every_row(tmp_path):
    log = tmp_path / "table.md"
    result = subprocess.run(
        [
            sys.executable,
            "-W",
            "ignore",
            "tools/bench_gpu.py",
            "--cpu",
            "--compute-dtype",
            "bfloat16",
            "--repeats",
            "1",
            "--log",
            str(log),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = log.read_text()
    assert "preset tiny" in table and "compute bfloat16 (weights float32)" in table
    rows = {
        line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")
    }
    for measure in ("train step", "meta-step K=2", "meta-step K=4", "scoring", "peak memory"):
        assert measure in rows, table
    assert "samples/s" in rows["train step"] and "x 4 proxy steps" in rows["meta-step K=4"]
    assert "of pure forward" in rows["scoring"]
    assert table.strip() in result.stdout
