"""Fault injection: SIGKILL at random points of `rate`, `score`, `dedup`, `train` and `pipeline`
on a tiny config, a rerun to completion, and a comparison with an uninterrupted run; plus a full
disk. Prints a table and writes it into docs/RELIABILITY.md (section `## Fault injection`).

    nice -n 5 .venv/bin/python tools/chaos.py                       # 5 kills per command
    .venv/bin/python tools/chaos.py --commands rate,dedup --kills 8 --seed 3

Every command runs as `python -m alchemist_jax.cli ...` in a subprocess (its own session, so
the kill reaches everything it started). Kill points are random and detected from the run's log
(`ALCHEMIST_PROGRESS_SECONDS=0`: every step, chunk or batch is a log line): the run is killed
once the chain of runs has written the k-th `[alchemist-jax]` line, k drawn uniformly over the
lines of the uninterrupted run, after a further random delay of 0..`--max-delay` seconds (so a
kill lands in the middle of a step, a checkpoint or a file write as often as between them).

Modes: `chained` (default): one workdir; each rerun is killed at the next point (in order) until
the kills are spent, then the last rerun completes (a kill while resuming is covered too).
`independent`: a fresh workdir per kill, each rerun to completion (twice the runs).

Checks after completion (`compare`): every Parquet file byte-equal to the uninterrupted run's,
every orbax checkpoint's latest step equal array for array (and its JSON run state), JSON
outputs equal (timings left out; a ratings file may differ only by the rating run's folder
name in its metadata), metrics.jsonl equal without a repeated (step, key), and no
temporary file left visible (`*.tmp-*`, `*orbax*tmp*`, scoring chunk folders).

Disk full (`disk_full`): a small tmpfs (`mount -t tmpfs`, needs root) holding a previous complete
output and a filler file; where mounting is refused, ENOSPC is injected into the process's file
writes instead. The command must exit 2 with one line naming the path, the previous output must
be intact and no temporary file visible.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

CONFIG = str(ROOT / "configs" / "demo.yaml")
LOG_PREFIX = "[alchemist-jax]"
EXIT_ERROR = 2

# The tiniest configuration every command shares (the tests' sizes).
TINY = [
    "data.pool.train_size=96",
    "data.pool.validation_size=32",
    "data.pool.test_size=32",
    "data.batch_size=8",
    "data.max_text_length=16",
    "data.corrupt.fraction=0.3",
    "model.width=32",
    "model.depth=1",
    "model.heads=2",
    "model.text_width=32",
    "model.patch_size=7",
    "model.text_trainable=false",
    "model.text_depth=1",
    "model.text_heads=2",
    "rater.width=16",
    "rater.hidden=32",
    "rate.population=2",
    "rate.inner_steps=2",
    "rate.val_batch_size=16",
    "rate.log_every=1",
    "rate.reset_every=2",
    "score.batch_size=16",
    "score.chunk_size=16",
    "dedup.batch_size=16",
    "train.batch_size=8",
    "train.warmup_steps=1",
    "evaluate.classifier_steps=20",
    "evaluate.sample_steps=2",
    "evaluate.grid_captions=2",
    "evaluate.grid_samples=2",
    "pipeline.seeds=[0]",
    "pipeline.budget=steps",
    "pipeline.penalty_steps=2",
]

# Sizes of the longer runs of this tool (`SMALL`) and of tests/test_chaos.py (`SMALLEST`).
SIZES = {
    "chaos": {
        "rate": ["rate.steps=8", "rate.checkpoint_every=2"],
        "score": ["score.scorer=loss", "score.proxy_steps=8", "score.draws=1"],
        "train": ["train.steps=16", "train.eval_every=4", "train.checkpoint_every=4"],
        "pipeline": [
            "rate.steps=4",
            "rate.checkpoint_every=2",
            "train.steps=4",
            "train.eval_every=2",
            "train.checkpoint_every=2",
            "pipeline.arms=[topk]",
        ],
    },
    "test": {
        "rate": ["rate.steps=4", "rate.checkpoint_every=1"],
        "score": ["score.scorer=clarity"],
        "train": ["train.steps=6", "train.eval_every=3", "train.checkpoint_every=2"],
        "pipeline": [
            "train.steps=2",
            "train.eval_every=1",
            "train.checkpoint_every=1",
            "pipeline.arms=[random]",
        ],
    },
}


def argv(command: str, workdir: Path, size: str = "chaos") -> list[str]:
    """The command line of `command` writing into `workdir` (its outputs stay inside it)."""
    head = [sys.executable, "-m", "alchemist_jax.cli", command, "--config", CONFIG]
    where = {
        "rate": ["--workdir", str(workdir)],
        "score": ["--out", str(workdir / "ratings.parquet")],
        "dedup": ["--out", str(workdir / "dedup.parquet")],
        "train": ["--workdir", str(workdir)],
        "pipeline": ["--workdir", str(workdir)],
    }[command]
    return [*head, *where, *TINY, *SIZES[size].get(command, [])]


def environment() -> dict[str, str]:
    """The subprocesses' environment: CPU, offline, a log line per progress step, and the test
    suite's compile settings (tests/conftest.py: XLA backend optimisation 0 and its compilation
    cache; tiny runs are compile-bound, and the uninterrupted and killed runs share them)."""
    cache = Path(os.environ.get("ALCHEMIST_CACHE") or Path.home() / ".cache" / "alchemist_jax")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        flags = f"{flags} --xla_backend_optimization_level=0".strip()
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "ALCHEMIST_OFFLINE": "1",
        "ALCHEMIST_PROGRESS_SECONDS": "0",
        "PYTHONPATH": str(ROOT),
        "XLA_FLAGS": flags,
        "JAX_COMPILATION_CACHE_DIR": os.environ.get(
            "JAX_COMPILATION_CACHE_DIR", str(cache / "jax_compile_tests")
        ),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1",
    }


# ==============================================================================================
# Running and killing
# ==============================================================================================


@dataclasses.dataclass
class Outcome:
    """How one subprocess ended: `code` (negative: killed by that signal), the `[alchemist-jax]`
    lines it wrote, and the last stderr lines."""

    code: int
    lines: int
    tail: list[str]


def run(
    command: list[str],
    kill_at: int | None = None,
    delay: float = 0.0,
    timeout: float = 1200,
    kill_on: str | None = None,
) -> Outcome:
    """Runs `command`; with `kill_at`, sends SIGKILL to its session `delay` seconds after its
    `kill_at`-th log line, with `kill_on` after the first stderr line holding that text (if it
    gets that far). Returns its `Outcome`."""
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines, tail, deadline = 0, [], time.monotonic() + timeout
    for line in process.stderr:
        tail = (tail + [line.rstrip()])[-20:]
        lines += line.startswith(LOG_PREFIX)
        if (kill_at is not None and lines >= kill_at) or (kill_on is not None and kill_on in line):
            time.sleep(delay)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            break
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise TimeoutError(f"{command[3]} ran over {timeout} s")
    process.stderr.close()
    code = process.wait()
    return Outcome(code, lines, tail)


def run_to_end(command: list[str]) -> Outcome:
    """Runs `command` to completion; RuntimeError with its last lines when it fails."""
    outcome = run(command)
    if outcome.code != 0:
        raise RuntimeError(f"{command[3]} failed ({outcome.code}):\n" + "\n".join(outcome.tail))
    return outcome


def killed_chain(command: Callable[[Path], list[str]], workdir: Path, points: list[tuple]) -> dict:
    """One workdir, SIGKILL at each (log line, delay) of `points` (log lines counted over the
    whole chain of runs), then a rerun to completion. Returns {"kills": delivered,
    "finished_early": runs that completed before their kill point, "runs"}."""
    done_lines, kills, early, runs = 0, 0, 0, 0
    for at, delay in sorted(points):
        outcome = run(command(workdir), kill_at=max(1, at - done_lines), delay=delay)
        runs += 1
        done_lines += outcome.lines
        if outcome.code == -signal.SIGKILL:
            kills += 1
        elif outcome.code == 0:
            early += 1
        else:
            raise RuntimeError(f"run {runs} exited {outcome.code}:\n" + "\n".join(outcome.tail))
    run_to_end(command(workdir))
    return {"kills": kills, "finished_early": early, "runs": runs + 1}


# ==============================================================================================
# Comparing a killed-and-resumed run with an uninterrupted one
# ==============================================================================================

TIMING_KEYS = ("seconds", "samples_per_s", "train_seconds", "elapsed")
UNCOMPARED = (".png", ".html", ".yaml")  # figures, the report and the config copy
TEMPORARY = ("*.tmp-*", "*orbax*tmp*", ".*.chunks")


def leftovers(workdir: Path) -> list[str]:
    """Temporary files and folders left under `workdir` (relative paths)."""
    found = {str(p.relative_to(workdir)) for pattern in TEMPORARY for p in workdir.rglob(pattern)}
    return sorted(found)


def metrics_repeats(path: Path) -> list[tuple[int, str]]:
    """(step, key) pairs logged more than once in a metrics.jsonl."""
    seen, repeats = set(), []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        for key in row:
            if key != "step":
                pair = (row["step"], key)
                if pair in seen:
                    repeats.append(pair)
                seen.add(pair)
    return repeats


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _checkpoint_arrays(folder: Path) -> tuple[int, list[np.ndarray], dict]:
    """(latest step, the state's arrays in tree order, the JSON run state) of an orbax folder."""
    import logging

    import jax
    import orbax.checkpoint as ocp

    from alchemist_jax.runtime import checkpoints

    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only notices

    step = checkpoints.latest_step(folder)
    manager = checkpoints.manager(folder, read_only=True)
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    arrays = [np.asarray(x) for x in jax.tree.leaves(state["state"])]
    return step, arrays, checkpoints.restore_run_state(manager, step)


def _same_parquet(path: Path, other: Path, reference: Path, candidate: Path) -> bool:
    """Byte-equal files, or (ratings of a rating run record its checkpoint folder in their
    metadata) equal once the candidate's folder name is replaced by the reference's: the same
    columns, bit for bit, and the same metadata."""
    if path.read_bytes() == other.read_bytes():
        return True
    import pyarrow.parquet as pq

    try:
        first, second = pq.read_table(path), pq.read_table(other)
    except (OSError, ValueError):  # not Parquet (pyarrow.ArrowInvalid is a ValueError)
        return False
    meta = {
        k: v.replace(str(candidate).encode(), str(reference).encode())
        for k, v in (second.schema.metadata or {}).items()
    }
    return (
        first.replace_schema_metadata(None).equals(second.replace_schema_metadata(None))
        and (first.schema.metadata or {}) == meta
        and meta != (second.schema.metadata or {})  # only the folder name differed
    )


def compare(reference: Path, candidate: Path) -> list[str]:
    """Differences between two run folders of the same command (empty: equal). See the module
    docstring for what is compared."""
    problems = [f"temporary file left: {p}" for p in leftovers(candidate)]
    for path in sorted(reference.rglob("*")):
        relative = path.relative_to(reference)
        other = candidate / relative
        if path.is_dir():
            if path.name == "checkpoints":
                if not other.is_dir():
                    problems.append(f"{relative}: missing")
                    continue
                step, arrays, state = _checkpoint_arrays(path)
                step2, arrays2, state2 = _checkpoint_arrays(other)
                same = (
                    step == step2
                    and len(arrays) == len(arrays2)
                    and all(np.array_equal(a, b) for a, b in zip(arrays, arrays2))
                )
                if not same:
                    problems.append(f"{relative}: step {step2} state differs from step {step}")
                if _without_timings(state) != _without_timings(state2):
                    problems.append(f"{relative}: run state differs")
            continue
        if "checkpoints" in relative.parts or "tensorboard" in relative.parts:
            continue
        if path.suffix in UNCOMPARED or any(path.match(p) for p in TEMPORARY):
            continue
        if not other.exists():
            problems.append(f"{relative}: missing")
        elif path.suffix == ".parquet":
            if not _same_parquet(path, other, reference, candidate):
                problems.append(f"{relative}: bytes differ")
        elif path.suffix == ".json":
            if _without_timings(json.loads(path.read_text())) != _without_timings(
                json.loads(other.read_text())
            ):
                problems.append(f"{relative}: JSON differs")
        elif path.name == "metrics.jsonl":
            repeats = metrics_repeats(other)
            if repeats:
                problems.append(f"{relative}: repeated (step, key) {repeats[:3]}")
            rows = {
                (r["step"], k): v
                for r in map(json.loads, path.read_text().splitlines())
                for k, v in r.items()
            }
            rows2 = {
                (r["step"], k): v
                for r in map(json.loads, other.read_text().splitlines())
                for k, v in r.items()
            }
            if rows != rows2:
                problems.append(f"{relative}: logged values differ")
    return problems


# ==============================================================================================
# Disk full
# ==============================================================================================


@contextlib.contextmanager
def small_disk(size_kb: int) -> Iterator[Path | None]:
    """A tmpfs of `size_kb` KiB mounted on a fresh folder, or None when mounting is refused."""
    folder = Path(tempfile.mkdtemp(prefix="alchemist-full-"))
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)],
            capture_output=True,
        ).returncode
        == 0
    )
    try:
        yield folder if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=False)
        shutil.rmtree(folder, ignore_errors=True)


def fill(folder: Path, leave_kb: int = 0) -> None:
    """Fills the file system of `folder` up to `leave_kb` KiB of free space."""
    free = shutil.disk_usage(folder).free - leave_kb * 1024
    with open(folder / "filler", "wb") as f:
        with contextlib.suppress(OSError):
            f.write(b"\0" * max(free, 0))


# A runner that makes every file write under ALCHEMIST_FULL_DIR fail with ENOSPC (when no
# tmpfs can be mounted): Python-level writes and orbax's (which go through Path / open too).
INJECT = """
import builtins, errno, os, pathlib, sys
full = os.environ["ALCHEMIST_FULL_DIR"]
real_open = builtins.open
def refusing_open(file, mode="r", *args, **kwargs):
    if any(m in mode for m in "wax") and os.path.abspath(str(file)).startswith(full):
        raise OSError(errno.ENOSPC, "No space left on device", str(file))
    return real_open(file, mode, *args, **kwargs)
builtins.open = refusing_open
pathlib.Path.write_bytes = lambda self, data: refusing_open(self, "wb").write(data)
from alchemist_jax import cli
sys.argv = ["alchemist-jax", *sys.argv[1:]]
sys.exit(cli.main())
"""


def disk_full(command: str, reference: Path, size: str) -> dict:
    """`command` rerun with another setting (so that it must write again) into a copy of its
    complete reference output on a full disk. Returns the table row's facts."""
    changed = {"dedup": ["dedup.max_hamming=12"], "score": ["data.corrupt.seed=1"]}[command]
    output = {"dedup": "dedup.parquet", "score": "ratings.parquet"}[command]
    with small_disk(size_kb=512) as mount:
        how = "tmpfs" if mount is not None else "injected ENOSPC"
        folder = mount or Path(tempfile.mkdtemp(prefix="alchemist-enospc-"))
        shutil.copy(reference / output, folder / output)
        before = (folder / output).read_bytes()
        line = argv(command, folder, size) + changed
        env = environment()
        if mount is not None:
            fill(folder)
        else:
            env["ALCHEMIST_FULL_DIR"] = str(folder)
            line = [sys.executable, "-c", INJECT, *line[3:]]
        result = subprocess.run(line, cwd=ROOT, env=env, capture_output=True, text=True)
        message = [
            x for x in result.stderr.splitlines() if x.startswith(f"alchemist-jax {command}")
        ]
        facts = {
            "how": how,
            "code": result.returncode,
            "message": message[-1] if message else result.stderr.strip().splitlines()[-1:],
            "intact": (folder / output).read_bytes() == before,
            # The chunk folder of `score` is its resumable state, not a temporary file.
            "leftovers": [p for p in leftovers(folder) if not p.endswith(".chunks")],
        }
        if mount is None:
            shutil.rmtree(folder, ignore_errors=True)
    facts["ok"] = (
        facts["code"] == EXIT_ERROR
        and isinstance(facts["message"], str)
        and str(folder) in facts["message"]
        and "No space left" in facts["message"]
        and facts["intact"]
        and not facts["leftovers"]
    )
    return facts


# ==============================================================================================
# The suite
# ==============================================================================================


def kill_points(rng: random.Random, lines: int, kills: int, max_delay: float) -> list[tuple]:
    """`kills` (log line, delay) pairs: lines uniform over [1, lines - 1], delays over
    [0, max_delay] seconds."""
    return [
        (rng.randint(1, max(1, lines - 1)), round(rng.uniform(0, max_delay), 3))
        for _ in range(kills)
    ]


def chaos(
    command: str,
    scratch: Path,
    kills: int,
    rng: random.Random,
    *,
    mode: str,
    max_delay: float,
    size: str = "chaos",
) -> dict:
    """Kills and reruns of one command against an uninterrupted run (see the module docstring).
    Returns the table row's facts."""
    reference = scratch / f"{command}-reference"
    started = time.monotonic()
    lines = run_to_end(argv(command, reference, size)).lines
    reference_seconds = time.monotonic() - started
    points = kill_points(rng, lines, kills, max_delay)
    groups = [points] if mode == "chained" else [[p] for p in points]
    facts = {"command": command, "log_lines": lines, "points": points, "kills": 0}
    facts.update(finished_early=0, runs=1, problems=[])
    for number, group in enumerate(groups):
        workdir = scratch / f"{command}-killed{number}"
        chain = killed_chain(lambda w: argv(command, w, size), workdir, group)
        facts["kills"] += chain["kills"]
        facts["finished_early"] += chain["finished_early"]
        facts["runs"] += chain["runs"]
        facts["problems"] += compare(reference, workdir)
    facts["reference_seconds"] = round(reference_seconds, 1)
    facts["seconds"] = round(time.monotonic() - started, 1)
    facts["ok"] = not facts["problems"]
    return facts


def table(rows: list[dict], full: list[dict], args: argparse.Namespace) -> str:
    """The Markdown section `## Fault injection` of docs/RELIABILITY.md."""
    out = [
        "## Fault injection",
        "",
        f"Measured by `tools/chaos.py --kills {args.kills} --mode {args.mode} --seed {args.seed}` "
        f"on {os.cpu_count()} CPU cores (tiny configs, `tools/chaos.py` SIZES): SIGKILL at "
        "random log lines (+ a random delay up to "
        f"{args.max_delay} s), rerun to completion, compared with an uninterrupted run: Parquet "
        "outputs byte-equal, checkpoints array-equal, JSON outputs equal, metrics.jsonl "
        "without a repeated (step, key), no temporary file visible. Seconds: wall time of the "
        "uninterrupted run plus the chain of killed runs, on a shared machine (for scale only).",
        "",
        "| command | kill points (log line, delay s) | kills delivered | runs | log lines "
        "(uninterrupted) | outputs equal, nothing left | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        verdict = "yes" if row["ok"] else "NO: " + "; ".join(row["problems"][:3])
        early = f" ({row['finished_early']} finished first)" if row["finished_early"] else ""
        out.append(
            f"| `{row['command']}` | {' '.join(f'{a}+{d:g}' for a, d in sorted(row['points']))} "
            f"| {row['kills']}{early} | {row['runs']} | {row['log_lines']} | {verdict} "
            f"| {row['seconds']} |"
        )
    if full:
        out += [
            "",
            "Disk full (a previous complete output in place, the command rerun with another "
            "setting so that it must write; exit 2 with one line naming the path expected):",
            "",
            "| command | how | exit | message | previous output intact | temporary files |",
            "|---|---|---|---|---|---|",
        ]
        for row in full:
            message = str(row["message"]).replace("|", "\\|")
            out.append(
                f"| `{row['command']}` | {row['how']} | {row['code']} | {message} | "
                f"{'yes' if row['intact'] else 'NO'} | {len(row['leftovers'])} |"
            )
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", default="rate,score,dedup,train,pipeline")
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs per command")
    parser.add_argument("--mode", choices=("chained", "independent"), default="chained")
    parser.add_argument("--max-delay", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scratch", type=Path, default=None, help="kept when given")
    parser.add_argument("--no-disk-full", action="store_true")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "RELIABILITY.md")
    parser.add_argument("--no-doc", action="store_true", help="print the table only")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="alchemist-chaos-"))
    scratch.mkdir(parents=True, exist_ok=True)
    rows, full = [], []
    try:
        for command in args.commands.split(","):
            print(f"chaos: {command} ...", flush=True)
            row = chaos(command, scratch, args.kills, rng, mode=args.mode, max_delay=args.max_delay)
            print(json.dumps(row), flush=True)
            rows.append(row)
            if command in ("dedup", "score") and not args.no_disk_full:
                facts = {
                    "command": command,
                    **disk_full(command, scratch / f"{command}-reference", "chaos"),
                }
                print(json.dumps(facts), flush=True)
                full.append(facts)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    section = table(rows, full, args)
    print(section)
    if not args.no_doc:
        from markdown_sections import write_section

        write_section(args.doc, "## Fault injection", section, "Reliability")
    return 0 if all(r["ok"] for r in rows + full) else 1


if __name__ == "__main__":
    sys.exit(main())
