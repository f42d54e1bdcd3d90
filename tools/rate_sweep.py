"""Rates the built-in pool with several meta-gradient modes and seeds; writes the AUROC table.

Each run is `python -m alchemist_jax.cli rate --config CONFIG --workdir ROOT/<run>` with the
mode's overrides, the seed and any extra overrides; runs go `--parallel` at a time (on one
accelerator they share it; on a CPU give each its own cores). The final AUROC per defect kind
(clean vs kind, scores z-scored within caption class) and the wall time of every run are written
as a section of docs/RESULTS.md.

    python tools/rate_sweep.py --modes unrolled:1 unrolled:4 unrolled:8 lookahead penalty \
        --seeds 0 1 --root runs/sweep --proxy-steps 1600
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from markdown_sections import write_section

FIRST_KINDS = ("all", "noise", "blank", "blur", "lowres", "caption_swap", "duplicate")


def kind_columns(results: list[dict]) -> list[str]:
    """The defect kinds the runs measured (their `auroc/<kind>` metrics): the tuned six in their
    usual order, any others after them alphabetically."""
    measured = {kind for r in results for kind in r.get("auroc", {})}
    return [k for k in FIRST_KINDS if k in measured] + sorted(measured - set(FIRST_KINDS))


def mode_overrides(mode: str, proxy_steps: int | None) -> list[str]:
    """`unrolled:K`, `lookahead` or `penalty[:K]` -> config overrides.

    With `proxy_steps`, every mode gets the same number of proxy training steps: the run has
    proxy_steps / K meta-steps, resets every half of them and measures AUROC every eighth.
    """
    name, _, k = mode.partition(":")
    if name == "unrolled":
        overrides, k = ["rate.mode=unrolled"], int(k or 4)
    elif name == "lookahead" and not k:
        overrides, k = ["rate.mode=lookahead"], 1
    elif name == "penalty":
        overrides, k = ["rate.mode=penalty"], int(k or 2)
    else:
        raise SystemExit(f"unknown mode {mode!r}: use unrolled:K, lookahead or penalty[:K]")
    overrides.append(f"rate.inner_steps={k}")
    if proxy_steps:
        steps = proxy_steps // k
        overrides += [
            f"rate.steps={steps}",
            f"rate.reset_every={max(1, steps // 2)}",
            f"rate.checkpoint_every={max(1, steps // 8)}",
        ]
    return overrides


def run_one(
    config: str, root: Path, mode: str, seed: int, proxy_steps: int | None, extra: list[str]
) -> dict:
    workdir = root / f"{mode.replace(':', '_k')}_seed{seed}"
    overrides = (
        mode_overrides(mode, proxy_steps) + [f"rate.seed={seed}", f"data.seed={seed}"] + extra
    )
    command = [
        sys.executable,
        "-m",
        "alchemist_jax.cli",
        "rate",
        "--config",
        config,
        "--workdir",
        str(workdir),
        *overrides,
    ]
    start = time.perf_counter()
    log = workdir.with_suffix(".log")
    workdir.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    metrics = workdir / "metrics.jsonl"
    rows = (
        [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    )
    measured = [r for r in rows if "auroc/all" in r]
    if not measured:
        print(f"{mode} seed {seed}: FAILED (exit {status}), see {log}", flush=True)
        return {"mode": mode, "seed": seed, "seconds": seconds, "failed": True}
    if status != 0:  # stopped early: report the last measured AUROC with its step
        print(f"{mode} seed {seed}: exit {status} after step {measured[-1]['step']}", flush=True)
    final = measured[-1]
    auroc = {
        key.removeprefix("auroc/"): value
        for key, value in final.items()
        if key.startswith("auroc/")
    }
    result = {"mode": mode, "seed": seed, "seconds": seconds, "step": final["step"], "auroc": auroc}
    print(
        f"{mode} seed {seed}: "
        + " ".join(f"{k} {v:.3f}" for k, v in auroc.items())
        + f" ({seconds:.0f} s)",
        flush=True,
    )
    return result


def write_results(path: Path, title: str, header: str, results: list[dict]) -> None:
    kinds = kind_columns(results)

    def cell(r, kind):
        return f"{r['auroc'][kind]:.3f}" if kind in r["auroc"] else "n/a"

    lines = [
        f"## {title}",
        "",
        header,
        "",
        "| mode | seed | meta-steps | " + " | ".join(kinds) + " | wall time (s) |",
        "|---|---|---|" + "---|" * len(kinds) + "---|",
    ]
    for r in results:
        if r.get("failed"):
            lines.append(f"| {r['mode']} | {r['seed']} | failed |" + " |" * (len(kinds) + 1))
            continue
        lines.append(
            f"| {r['mode']} | {r['seed']} | {r['step']} | "
            + " | ".join(cell(r, k) for k in kinds)
            + f" | {r['seconds']:.0f} |"
        )
    by_mode: dict[str, list[dict]] = {}
    for r in results:
        if not r.get("failed"):
            by_mode.setdefault(r["mode"], []).append(r)
    lines += [
        "",
        "Mean ± std over seeds:",
        "",
        "| mode | " + " | ".join(kinds) + " |",
        "|---|" + "---|" * len(kinds),
    ]
    for mode, rows in by_mode.items():
        cells = []
        for k in kinds:
            values = [r["auroc"][k] for r in rows if k in r["auroc"]]
            if not values:
                cells.append("n/a")
                continue
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    write_section(path, f"## {title}", "\n".join(lines), "Results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["unrolled:1", "unrolled:4", "unrolled:8", "lookahead", "penalty"],
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--root", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument(
        "--proxy-steps",
        type=int,
        default=None,
        help="equal proxy training steps for every mode: rate.steps = N / K",
    )
    parser.add_argument("--out", type=Path, default=Path("docs/RESULTS.md"))
    parser.add_argument("--title", default="Rater AUROC by meta-gradient mode")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run")
    args = parser.parse_args()

    jobs = [(mode, seed) for mode in args.modes for seed in args.seeds]
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        results = list(
            pool.map(
                lambda job: run_one(args.config, args.root, *job, args.proxy_steps, args.overrides),
                jobs,
            )
        )
    import jax

    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    header = (
        f"Measured {time.strftime('%Y-%m-%d')} on {device} ({platform.machine()}, "
        f"{os.cpu_count()} CPU cores), {args.parallel} run(s) at a time; config "
        f"`{args.config}` with `{' '.join(args.overrides) or '(no overrides)'}`. AUROC of "
        "clean vs each defect kind on the final EMA rater's scores, z-scored within caption "
        "class. Command: `python tools/rate_sweep.py " + " ".join(sys.argv[1:]) + "`."
    )
    write_results(args.out, args.title, header, results)


if __name__ == "__main__":
    main()
