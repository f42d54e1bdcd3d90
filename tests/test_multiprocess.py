"""Two processes (`jax.distributed` on localhost, gloo collectives), 2 fake CPU devices each,
run `rate`, `score` and `train` through the CLI and get the results of one process with the
same 4-device mesh (data=2 across the processes, population=2 inside each); each process reads
only its rows of every batch. The commands run in `multiprocess_run.py`."""

import collections
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from alchemist_jax.runtime import runlog

HELPER = Path(__file__).with_name("multiprocess_run.py")
ROOT = HELPER.parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    drop = ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "JAX_COORDINATOR_ADDRESS")
    return {k: v for k, v in os.environ.items() if k not in drop}


def _start(devices: int, workdir: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-W", "ignore", str(HELPER), str(devices), str(workdir), *flags],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output[-3000:]


def _ids(path: Path) -> list[int]:
    return json.loads(path.read_text())


def test_two_processes_equal_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    reference = _start(4, one)
    port = _free_port()
    workers = [
        _start(
            2,
            two,
            "--coordinator",
            f"localhost:{port}",
            "--process-count",
            "2",
            "--process-id",
            str(index),
        )
        for index in range(2)
    ]
    for process in (reference, *workers):
        _finish(process)

    # Losses and metrics: the same global batches on the same mesh; the two runs differ only in
    # how the cross-device sums are carried out, so they agree to float32 round-off of sums
    # over <= 32 rows (rtol 1e-5, with room for four optimizer steps).
    for run in ("rate", "train"):
        single, multi = (runlog.read_metrics(w / run / runlog.METRICS_FILE) for w in (one, two))
        assert [r["step"] for r in single] == [r["step"] for r in multi]
        for left, right in zip(single, multi):
            assert left.keys() == right.keys()
            for key, value in left.items():
                if key.startswith("auroc/"):  # ranks: a tie broken by round-off moves them
                    continue
                np.testing.assert_allclose(right[key], value, rtol=1e-5, err_msg=f"{run} {key}")
    # Ratings: the same ids in pool order; each score is the rater's forward pass of one row.
    single, multi = (pq.read_table(w / "ratings.parquet") for w in (one, two))
    np.testing.assert_array_equal(multi["id"].to_numpy(), single["id"].to_numpy())
    np.testing.assert_allclose(
        multi["score"].to_numpy(), single["score"].to_numpy(), rtol=1e-5, atol=1e-6
    )
    assert not (two / ".ratings.parquet.chunks").exists()
    # Each process read half of every batch (data=2 splits the rows across the processes), and
    # together they read what the single process read.
    for command in ("rate", "score", "train"):
        everything = collections.Counter(_ids(one / f"{command}-ids-0.json"))
        parts = [collections.Counter(_ids(two / f"{command}-ids-{i}.json")) for i in range(2)]
        assert parts[0] + parts[1] == everything, command
        if command == "score":  # chunks of 32 alternate between the processes
            assert sum(parts[0].values()) == 64 and sum(parts[1].values()) == 32
        else:
            assert sum(parts[0].values()) == sum(parts[1].values()) == sum(everything.values()) // 2
