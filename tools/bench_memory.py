"""Peak host memory of `alchemist-jax score` and `rate` on a small and a 10x larger pool: does the
command stream the pool, or hold it in memory?

    .venv/bin/python tools/bench_memory.py \
        --pool 100k=/work/pools/pool_100k/1.0.0 --pool 1m=/work/pools/pool_1m/1.0.0 \
        --validation /work/pools/pool_val/1.0.0 --extra-override data.in_memory_limit=0 \
        --workdir /work/pools/bench_after --baseline /work/pools/bench_before/results.json

One pool per call also works (`--workdir` per pool, `--no-docs`); then
`--combine <workdir 100k>/results.json <workdir 1m>/results.json` tabulates them together.

The pools are TFDS array_record datasets made by `alchemist-jax prepare` from the manifests of
`tools/make_large_pool.py` (its docstring has the commands); `--validation` is a small prepared
dataset passed as `data.validation_source` (a manifest holds one split, so the pools have no
`validation` split of their own).

Every command runs once per pool, in that order, as a child process of this one (the command line
a user types, `configs/demo.yaml` plus overrides), with stdout/stderr in `<workdir>/<pool>/
<command>.log`. Measured per run:

  peak RSS  `ru_maxrss` of the child from `os.wait4`: the kernel's high-water mark of its resident
            memory (the largest of the child and any descendants it waited for; not a sum);
  tree RSS  the largest sum of RSS over the child and all its descendants, sampled every
            `--interval` s with psutil (a check that no worker process holds the pool; a short
            spike between samples can be missed);
  wall      seconds from start to exit (includes start-up and XLA compiling; the persistent
            compilation cache makes the later runs of a command compile less).

A watchdog kills the child's process group when its tree RSS passes `--limit-gib` (the machine must
stay usable); such a run is reported as "killed above N GiB". A run that fails reports its exit
status and last error line. The ratio of the largest pool to the smallest is printed per command,
in bold where it is at most `--max-ratio` (1.3: the command streams the pool). The table goes to
stdout and, unless `--no-docs`, into the section `HEADING` of docs/BENCHMARKS.md; the raw numbers
to `<workdir>/results.json`. `--baseline <results.json of an earlier run>` adds that run's peak
RSS as "before" columns (e.g. the materialising data path, measured without the streaming key).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from markdown_sections import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLI = str(ROOT / ".venv" / "bin" / "alchemist-jax")
HEADING = "## Peak host memory of score and rate: 100k vs 1M pool"
GIB = 2**30

# name -> arguments after `alchemist-jax`; {work} is the run folder of this command and pool.
COMMANDS = {
    "score_clarity": [
        "score",
        "--config",
        "configs/demo.yaml",
        "--out",
        "{work}/clarity.parquet",
        "--scorer",
        "clarity",
        "score.batch_size=256",
    ],
    "rate": [
        "rate",
        "--config",
        "configs/demo.yaml",
        "--workdir",
        "{work}/rate",
        "rate.steps=3",
        "rate.checkpoint_every=3",
        "rate.log_every=1",
        "data.batch_size=16",
        "rate.val_batch_size=128",
    ],
    # The rater of this pool's `rate` run (so it must come after `rate`).
    "score_rater": [
        "score",
        "--config",
        "configs/demo.yaml",
        "--out",
        "{work}/rater.parquet",
        "--scorer",
        "rater",
        "--rater",
        "{work}/rate",
        "score.batch_size=256",
    ],
}


def command_line(name: str, pool: str, validation: str, work: Path, extra: list[str]) -> list[str]:
    args = [a.format(work=work) for a in COMMANDS[name]]
    data = [f"data.source={pool}", f"data.validation_source={validation}"]
    return [CLI, *args, *data, "data.corrupt.fraction=0", *extra]


def _tree_rss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # exited between listing and reading
            pass
    return total


def measure(argv: list[str], log: Path, limit: int, interval: float, timeout: float) -> dict:
    """Runs `argv` (cwd: the repo root) and returns its peak RSS, tree RSS, wall time, status."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        start = time.perf_counter()
        child = subprocess.Popen(
            argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        watched = psutil.Process(child.pid)
        peak_tree, killed, done = 0, None, threading.Event()

        def watch() -> None:
            nonlocal peak_tree, killed
            while not done.wait(interval):
                try:
                    rss = _tree_rss(watched)
                except psutil.Error:
                    return
                peak_tree = max(peak_tree, rss)
                elapsed = time.perf_counter() - start
                if rss > limit or elapsed > timeout:
                    killed = "memory" if rss > limit else "timeout"
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.pid, signal.SIGKILL)
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        done.set()
        watcher.join()
        child.returncode = os.waitstatus_to_exitcode(status)
    with contextlib.suppress(ProcessLookupError):  # leftovers of a killed or crashed run
        os.killpg(child.pid, signal.SIGKILL)
    result = {
        "argv": argv,
        "returncode": child.returncode,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux: KiB
        "peak_tree_rss_bytes": peak_tree,
        "wall_s": round(wall, 1),
        "killed": killed,
        "log": str(log),
    }
    if child.returncode != 0 and killed is None:
        result["error"] = _last_error(log)
    return result


def _last_error(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line and not line.startswith("[alchemist-jax]")]
    return lines[-1][:300] if lines else "(empty log)"


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def _cell(run: dict, limit_gib: float) -> str:
    if run["killed"] == "memory":
        return f"killed above {limit_gib:g} GiB"
    if run["killed"] == "timeout":
        return "timed out"
    if run["returncode"] != 0:
        return f"failed (exit {run['returncode']})"
    return _gib(run["peak_rss_bytes"])


def _ratio(small: dict, large: dict, max_ratio: float) -> str:
    if small["returncode"] == 0 and large["killed"] == "memory":
        return f"> {large['peak_tree_rss_bytes'] / small['peak_rss_bytes']:.1f}"
    if any(r["returncode"] != 0 for r in (small, large)):
        return "-"
    ratio = large["peak_rss_bytes"] / small["peak_rss_bytes"]
    return f"**{ratio:.2f}**" if ratio <= max_ratio else f"{ratio:.2f}"


def table(results: dict, args, baseline: dict | None) -> str:
    pools = list(results["pools"])
    small, large = pools[0], pools[-1]
    head = ["command"]
    if baseline:
        head += [f"before: peak RSS {p} (GiB)" for p in (small, large)] + ["before: ratio"]
    head += [f"peak RSS {p} (GiB)" for p in pools]
    head += [f"tree RSS {p} (GiB)" for p in pools] + [f"wall {p} (s)" for p in pools]
    head += [f"ratio {large}/{small}"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in results["commands"]:
        runs = {p: results["runs"][p][name] for p in pools}
        cells = [f"`{name}`"]
        if baseline:
            before = {p: baseline["runs"].get(p, {}).get(name) for p in (small, large)}
            cells += [
                _cell(before[p], baseline["limit_gib"]) if before[p] else "-"
                for p in (small, large)
            ]
            cells.append(
                _ratio(before[small], before[large], args.max_ratio)
                if all(before.values())
                else "-"
            )
        cells += [_cell(runs[p], args.limit_gib) for p in pools]
        cells += [
            _gib(runs[p]["peak_tree_rss_bytes"]) if runs[p]["peak_tree_rss_bytes"] else "-"
            for p in pools
        ]
        cells += [str(runs[p]["wall_s"]) for p in pools]
        cells.append(_ratio(runs[small], runs[large], args.max_ratio))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def section(results: dict, text_table: str, args) -> str:
    pools = results["pools"]
    lines = [
        HEADING,
        "",
        f"`tools/bench_memory.py`, {results['date']}; {results['machine']}; jax "
        f"{results['jax']}, alchemist_jax at {results['commit']}. Pools: "
        + ", ".join(f"{p} = `{path}` ({results['sizes'][p]} samples)" for p, path in pools.items())
        + f"; validation `{results['validation']}`. Each command ran once per pool, in that order,"
        " as a child process. Peak RSS: the child's `ru_maxrss` (`os.wait4`); tree RSS: the "
        f"largest sum over the child and its descendants, sampled every {args.interval:g} s; a "
        f"child above {args.limit_gib:g} GiB is killed. Ratio: peak RSS of the largest pool over "
        f"the smallest, **bold** where at most {args.max_ratio:g} (the pool is streamed).",
        "",
        text_table,
        "",
        "Commands (`{pool}` and `{work}` per pool):",
        "",
        "```",
    ]
    first = next(iter(pools))
    for name in results["commands"]:
        run = results["runs"][first][name]
        line = shlex.join(["alchemist-jax", *run["argv"][1:]])
        line = line.replace(pools[first], "{pool}").replace(str(Path(run["log"]).parent), "{work}")
        lines.append(line)
    lines += ["```", ""]
    failures = [
        f"- `{name}` on {pool}: {run['error']}"
        for pool in pools
        for name, run in results["runs"][pool].items()
        if run.get("error")
    ]
    if failures:
        lines += ["Failures (last line of the log):", "", *failures, ""]
    return "\n".join(lines)


def _machine() -> str:
    memory = psutil.virtual_memory().total / GIB
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), {memory:.0f} GiB RAM, {platform.system()}"


def _pool_size(path: str) -> int | None:
    """Samples of the `train` split, from the TFDS dataset_info.json (without importing TFDS)."""
    info = Path(path) / "dataset_info.json"
    try:
        splits = json.loads(info.read_text())["splits"]
        split = next(s for s in splits if s["name"] == "train")
        return sum(int(n) for n in split["shardLengths"])
    except (OSError, KeyError, StopIteration, ValueError):
        return None


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def run_all(args, pools: dict[str, str], commands: list[str]) -> dict:
    """Runs every command on every pool; returns the results (also in <workdir>/results.json)."""
    commit = _git("rev-parse", "--short", "HEAD")
    if _git("status", "--porcelain", "--", "alchemist_jax"):
        commit += " + uncommitted changes in alchemist_jax/"
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": _machine(),
        "jax": importlib.metadata.version("jax"),
        "commit": commit,
        "pools": pools,
        "sizes": {name: _pool_size(path) for name, path in pools.items()},
        "validation": args.validation,
        "commands": commands,
        "extra_overrides": args.extra_override,
        "limit_gib": args.limit_gib,
        "workdir": str(args.workdir),
        "runs": {},
    }
    limit = int(args.limit_gib * GIB)
    for pool, path in pools.items():
        work = args.workdir / pool
        shutil.rmtree(work, ignore_errors=True)  # score and rate resume; start fresh
        results["runs"][pool] = {}
        for name in commands:
            argv = command_line(name, path, args.validation, work, args.extra_override)
            print(f"[{pool}] {name}: {shlex.join(argv)}", flush=True)
            run = measure(argv, work / f"{name}.log", limit, args.interval, args.timeout)
            results["runs"][pool][name] = run
            print(
                f"[{pool}] {name}: exit {run['returncode']}, peak RSS "
                f"{_gib(run['peak_rss_bytes'])} GiB, tree {_gib(run['peak_tree_rss_bytes'])} GiB, "
                f"{run['wall_s']} s"
                + (f", killed ({run['killed']})" if run["killed"] else "")
                + (f"\n    {run['error']}" if run.get("error") else ""),
                flush=True,
            )
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2))
    print(f"raw numbers: {args.workdir / 'results.json'}")
    return results


def combine(files: list[Path]) -> dict:
    """The results of several runs (e.g. one pool each) as one, pools in the order given; the
    other fields come from the first file."""
    parts = [json.loads(Path(f).read_text()) for f in files]
    results = {**parts[0], "pools": {}, "sizes": {}, "runs": {}}
    for part in parts:
        for pool in part["pools"]:
            results["pools"][pool] = part["pools"][pool]
            results["sizes"][pool] = part["sizes"][pool]
            results["runs"][pool] = part["runs"][pool]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--pool",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a prepared pool (TFDS dataset dir), smallest first",
    )
    parser.add_argument("--validation", help="data.validation_source of the runs")
    parser.add_argument(
        "--commands",
        default=",".join(COMMANDS),
        help=f"comma-separated, in order (of {', '.join(COMMANDS)})",
    )
    parser.add_argument(
        "--extra-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override added to every command, e.g. data.in_memory_limit=0",
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_memory"))
    parser.add_argument("--limit-gib", type=float, default=12.0, help="kill a child above this")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per command")
    parser.add_argument("--interval", type=float, default=0.1, help="tree RSS sampling period")
    parser.add_argument("--max-ratio", type=float, default=1.3)
    parser.add_argument("--baseline", type=Path, help="results.json of an earlier run: 'before'")
    parser.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        metavar="RESULTS",
        help="run nothing: tabulate these results.json files (e.g. one per pool) as one",
    )
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/BENCHMARKS.md")
    args = parser.parse_args()

    if args.combine:
        results = combine(args.combine)
        args.workdir = Path(results.get("workdir", args.workdir))
        args.limit_gib = results["limit_gib"]
    else:
        pools = dict(item.split("=", 1) for item in args.pool)
        commands = [c.strip() for c in args.commands.split(",") if c.strip()]
        unknown = set(commands) - set(COMMANDS)
        if unknown:
            parser.error(f"unknown commands {sorted(unknown)}")
        if not pools or not args.validation:
            parser.error("give --pool (one or more) and --validation, or --combine")
        results = run_all(args, pools, commands)
    if len(results["pools"]) < 2:
        print("one pool: no ratio; tabulate it with another run's results.json via --combine")
        return
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    text = table(results, args, baseline)
    print(text)
    if not args.no_docs:
        write_section(
            ROOT / "docs" / "BENCHMARKS.md", HEADING, section(results, text, args), "Benchmarks"
        )


if __name__ == "__main__":
    main()
