"""Benchmark of the scoring pass, written to docs/BENCHMARKS.md (section "Scoring throughput").

Measured side by side in one run, repeats interleaved (the machines are shared and noisy):
  1. end-to-end scoring throughput: `scoring.score_pool` with the rater of the config on an
     in-memory pool of N samples (reading batches, host-to-device copies, the jitted rater,
     chunk files and the final Parquet file), against
  2. the rater's jitted forward pass alone on the same N samples already on the device, in
     batches of the same size;
  the ratio 1/2 of throughputs (the median over repeats of each repeat's ratio: both run
  back to back, under the same load) has the target >= 0.9;
  3. the end-to-end time for 4N samples, against N (expect 4: linear in the pool size).

The pool is synthetic, with the shapes of the config's data (R x R x C images in [-1, 1], L
tokens); the rater has the config's sizes (default configs/demo.yaml) with random parameters.

Usage: python tools/bench_score.py [--config configs/demo.yaml] [--size 8000] [--repeats 9]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from markdown_sections import write_section

from alchemist_jax import models, scoring
from alchemist_jax.config import load_config
from alchemist_jax.data import pipeline
from alchemist_jax.data.sources import ArraySource
from alchemist_jax.runtime.parallel import model_inputs

SECTION = "## Scoring throughput"


def synthetic_pool(size: int, resolution: int, channels: int, text_length: int) -> ArraySource:
    """A preprocessed-looking pool: float32 images in [-1, 1], token ids, full token masks."""
    rng = np.random.default_rng(0)
    return ArraySource(
        "synthetic",
        np.arange(size),
        None,
        None,
        extra={
            "image": rng.uniform(-1, 1, (size, resolution, resolution, channels)).astype(
                np.float32
            ),
            "tokens": rng.integers(0, 49406, (size, text_length)).astype(np.int32),
            "token_mask": np.ones((size, text_length), bool),
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--size", type=int, default=8000, help="N; the linearity check uses 4N")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path("docs/BENCHMARKS.md"))
    args = parser.parse_args()
    cfg = load_config(args.config)
    data, batch_size = cfg.data, cfg.score.batch_size
    pools = {
        n: synthetic_pool(n, data.resolution, data.channels, data.max_text_length)
        for n in (args.size, 4 * args.size)
    }
    example = model_inputs(pools[args.size][0])
    example = {k: np.stack([v] * batch_size) for k, v in example.items()}
    graphdef, params, rest = models.init_rater(
        cfg.rater, example, jax.random.key(0), data.max_text_length
    )
    score = jax.jit(models.rater_score_fn(graphdef, rest))

    def score_batch(batch):
        return score(params, model_inputs(batch))

    # The forward pass alone: the same N samples in the same batches, already on the device.
    on_device = [
        jax.device_put(model_inputs(batch))
        for batch in pipeline.eval_iterator(pools[args.size], batch_size)
    ]

    def forward() -> float:
        start = time.perf_counter()
        jax.block_until_ready([score(params, batch) for batch in on_device])
        return time.perf_counter() - start

    def end_to_end(n: int, folder: Path) -> float:
        out = folder / f"ratings{n}.parquet"
        start = time.perf_counter()
        scoring.score_pool(
            score_batch,
            pools[n],
            out,
            batch_size=batch_size,
            chunk_size=cfg.score.chunk_size,
            metadata={"scorer": "rater"},
            desc=f"score {n}",
        )
        seconds = time.perf_counter() - start
        out.unlink()
        return seconds

    times: dict[str, list[float]] = {"forward": [], "pool": [], "pool4": []}
    with tempfile.TemporaryDirectory() as folder:
        forward(), end_to_end(args.size, Path(folder))  # compile, warm up
        for _ in range(args.repeats):
            times["forward"].append(forward())
            times["pool"].append(end_to_end(args.size, Path(folder)))
            times["pool4"].append(end_to_end(4 * args.size, Path(folder)))
    print({k: [round(x, 3) for x in v] for k, v in times.items()})
    write_report(args, cfg, times, models.count_params(params))


def write_report(args, cfg, times: dict[str, list[float]], rater_params: int) -> None:
    n, batch_size = args.size, cfg.score.batch_size
    median = {k: statistics.median(v) for k, v in times.items()}
    forward, pool, pool4 = (n / median["forward"], n / median["pool"], 4 * n / median["pool4"])
    ratio = statistics.median(f / p for f, p in zip(times["forward"], times["pool"]))
    linear = statistics.median(b / a for a, b in zip(times["pool"], times["pool4"]))
    print(
        f"forward {forward:,.0f}/s, end-to-end {pool:,.0f}/s (ratio {ratio:.2f}), "
        f"4N/N time {linear:.2f}"
    )
    data = cfg.data
    lines = [
        SECTION,
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), jax {jax.__version__}; "
        f"the rater of `{args.config}` ({rater_params:,} parameters) on a synthetic in-memory "
        f"pool of {data.resolution}x{data.resolution}x{data.channels} images and "
        f"{data.max_text_length} tokens, batch {batch_size}, chunks of {cfg.score.chunk_size} "
        f"samples (rounded up to whole batches), median of {args.repeats} interleaved repeats. "
        f"Command: `python tools/bench_score.py --config {args.config} --size {n}`.",
        "",
        "| measure | samples/s | seconds |",
        "|---|---|---|",
        f"| rater forward, batches already on the device (N={n:,}) | {forward:,.0f} | "
        f"{median['forward']:.3f} |",
        f"| `score_pool` end to end (N={n:,}) | {pool:,.0f} | {median['pool']:.3f} |",
        f"| `score_pool` end to end (4N={4 * n:,}) | {pool4:,.0f} | {median['pool4']:.3f} |",
        "",
        f"- End-to-end / forward-only throughput: **{ratio:.2f}** (median of the repeats' "
        f"ratios; target >= 0.9: {'met' if ratio >= 0.9 else 'missed'}).",
        f"- Time for 4N / time for N: **{linear:.2f}** (median of the repeats' ratios; 4.00 = "
        "linear).",
        "",
    ]
    write_section(args.out, SECTION, "\n".join(lines), "Benchmarks")


if __name__ == "__main__":
    main()
