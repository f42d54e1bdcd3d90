"""Fault injection (the cheap version of tools/chaos.py): `alchemist-jax rate`, `score`,
`dedup`, `train` and `pipeline` in subprocesses, SIGKILLed at a point read from their log, rerun
to completion and compared with an uninterrupted run (Parquet bytes, checkpoint arrays, JSON
outputs, metrics.jsonl without a repeated (step, key), no temporary file left); and a full disk
(a tmpfs when mountable, injected ENOSPC otherwise): exit 2, one line naming the path, the
previous output intact."""

import random
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import chaos  # noqa: E402

REFERENCES: dict[str, Path] = {}  # command -> its uninterrupted run (reused by the disk test)

# Where each command is killed: a progress line of its log (`tools/chaos.py` SIZES["test"];
# every step, chunk or batch is a line with ALCHEMIST_PROGRESS_SECONDS=0).
KILL_ON = {
    "rate": "rate (unrolled): 2/4 step",  # checkpoint_every=1: mid-run, between checkpoints
    "score": "score (clarity): 48/96 sample",  # 3 of 6 chunks
    "dedup": "dedup candidates: 6/12 key",  # nothing saved before its one file
    "train": "train: 3/6 step",  # checkpoint_every=2: one step past a checkpoint
    "pipeline": "train random: 1/2 step",  # after select, before evaluate and the report
}


# The suite kills the three cheap commands; `rate` (about 100 s of compiling here) and `pipeline`
# are killed by `tools/chaos.py`, and their resumes are tested in-process by test_rate.py (stopped
# and rerun), test_failures.py (SIGTERM / SIGINT) and test_end_to_end.py (a finished pipeline).
CI_COMMANDS = ("score", "dedup", "train")


@pytest.mark.parametrize("command", CI_COMMANDS)
def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path, command):
    """The uninterrupted run and the killed one run at the same time (2 cores)."""
    reference = tmp_path / f"{command}-reference"
    workdir = tmp_path / f"{command}-killed"
    with ThreadPoolExecutor(1) as pool:
        uninterrupted = pool.submit(chaos.run_to_end, chaos.argv(command, reference, "test"))
        killed = chaos.run(chaos.argv(command, workdir, "test"), kill_on=KILL_ON[command])
        uninterrupted.result()
    assert killed.code == -signal.SIGKILL, killed.tail  # the kill landed before the end
    chaos.run_to_end(chaos.argv(command, workdir, "test"))
    REFERENCES[command] = reference
    assert chaos.compare(reference, workdir) == []


def test_compare_sees_a_changed_output_and_a_temporary_file(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
        (tmp_path / name / "x.parquet").write_bytes(b"same")
    assert chaos.compare(tmp_path / "a", tmp_path / "b") == []
    (tmp_path / "b" / "x.parquet").write_bytes(b"other")
    (tmp_path / "b" / ".x.parquet.tmp-123").write_bytes(b"")
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 1, "loss": 1.0}\n')
    assert chaos.compare(tmp_path / "a", tmp_path / "b") == [
        "temporary file left: .x.parquet.tmp-123",
        "metrics.jsonl: repeated (step, key) [(1, 'loss')]",
        "x.parquet: bytes differ",
    ]


def test_disk_full_keeps_the_previous_output_and_names_the_path(tmp_path):
    reference = REFERENCES.get("dedup")
    if reference is None or not reference.exists():  # run alone: make one
        reference = tmp_path / "dedup-reference"
        chaos.run_to_end(chaos.argv("dedup", reference, "test"))
    facts = chaos.disk_full("dedup", reference, "test")
    assert facts["ok"], facts


def test_kill_points_are_reproducible():
    first = chaos.kill_points(random.Random(3), 40, 5, 0.5)
    assert first == chaos.kill_points(random.Random(3), 40, 5, 0.5)
    assert all(1 <= line <= 39 and 0 <= delay <= 0.5 for line, delay in first)
