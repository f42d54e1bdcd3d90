"""Benchmark of the duplicate search, written to docs/BENCHMARKS.md (section "Near-duplicate
search").

`dedup.find_groups` on synthetic precomputed fingerprints (no images, so without the final pixel
check): at the smaller size N1, and at the larger size N2 twice, once with more classes of the
same size and once with the same classes grown denser; for each, the growth exponent of the
wall time log(t2 / t1) / log(N2 / N1) (1 = linear, 2 = all pairs). The fingerprints imitate the
built-in pool's in shape: embeddings (D = dedup.embedding_size^2) around class centres (cosine
~0.65 between two samples of a class), 64-bit hashes with each bit of a class's hash flipped
with probability `FLIP` per sample, and `--planted` of the samples near copies of another
sample: its embedding plus noise (cosine ~0.99), 0-6 hash bits flipped. Recall: the fraction of
planted copies grouped with their source; the other pairs within groups are reported too.

Usage: python tools/bench_dedup.py [--sizes 100000 1000000] [--class-size 100]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from markdown_sections import write_section

from alchemist_jax import dedup
from alchemist_jax.config import load_config

SECTION = "## Near-duplicate search (`tools/bench_dedup.py`)"
# Each bit of a class's hash flips with this probability per sample: classmates differ in ~11.5
# bits, within the default Hamming filter, as most same-class pairs of the built-in pool do (the
# hardest case for the filter: nearly every neighbour pair goes on to the cosine).
FLIP = 0.1


def synthetic_fingerprints(
    count: int, dim: int, class_size: int, planted: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(hashes (N,) uint64, unit embeddings (N, D) float32, copies (P,) and their sources (P,)
    as indices; sources are never copies), built as the module docstring says."""
    rng = np.random.default_rng(seed)
    clusters = max(1, count // class_size)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    cluster = rng.integers(0, clusters, count)
    embeddings = np.empty((count, dim), np.float32)
    chunk = 100_000
    for start in range(0, count, chunk):  # noise of norm ~0.73: cosine ~0.65 between classmates
        rows = slice(start, start + chunk)
        noise = rng.standard_normal((len(cluster[rows]), dim), dtype=np.float32)
        embeddings[rows] = centres[cluster[rows]] + noise * (0.73 / math.sqrt(dim))
    centre_hashes = rng.integers(0, 2**63, clusters, dtype=np.int64).astype(np.uint64) * 2 + 1
    flips = dedup.pack_bits(rng.random((count, 64)) < FLIP)
    hashes = centre_hashes[cluster] ^ flips
    order = rng.permutation(count)
    copies, originals = order[: round(planted * count)], order[round(planted * count) :]
    sources = rng.choice(originals, len(copies))
    noise = rng.standard_normal((len(copies), dim), dtype=np.float32)
    embeddings[copies] = embeddings[sources] + noise * (0.2 / math.sqrt(dim))
    bits = rng.random((len(copies), 64)) < rng.integers(0, 7, (len(copies), 1)) / 64
    hashes[copies] = hashes[sources] ^ dedup.pack_bits(bits)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return hashes, embeddings, copies, sources


def measure(count: int, cfg, class_size: int, planted: float, repeats: int) -> dict:
    """`find_groups` on one synthetic pool `repeats` times: the median wall time, the counts and
    the recall of the planted copies."""
    hashes, embeddings, copies, sources = synthetic_fingerprints(
        count, cfg.embedding_size**2, class_size, planted
    )
    ids = np.arange(count, dtype=np.int64)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        groups, counts = dedup.find_groups(ids, hashes, embeddings, cfg, show_progress=False)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    truth = np.arange(count)
    truth[copies] = sources
    _, sizes = np.unique(groups, return_counts=True)
    within = int(np.sum(sizes * (sizes - 1) // 2))
    _, true_sizes = np.unique(np.stack([groups, truth], 1), axis=0, return_counts=True)
    true_pairs = int(np.sum(true_sizes * (true_sizes - 1) // 2))
    return {
        "count": count,
        "seconds": seconds,
        **counts,
        "recall": float(np.mean(groups[copies] == groups[sources])),
        "pairs": within,
        "other_pairs": within - true_pairs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--sizes", type=int, nargs=2, default=[100_000, 1_000_000])
    parser.add_argument(
        "--class-size", type=int, default=100, help="samples per class at the smaller size"
    )
    parser.add_argument("--planted", type=float, default=0.01, help="fraction of near copies")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per pool (median)")
    parser.add_argument("--out", type=Path, default=Path("docs/BENCHMARKS.md"))
    args = parser.parse_args()
    cfg = load_config(args.config).dedup
    small_count, large_count = args.sizes
    classes = small_count // args.class_size
    # The larger pool twice: more classes of the same size, and the same classes, denser.
    rows = [
        (
            f"{classes:,} of {args.class_size}",
            measure(small_count, cfg, args.class_size, args.planted, args.repeats),
        ),
        (
            f"{large_count // args.class_size:,} of {args.class_size}",
            measure(large_count, cfg, args.class_size, args.planted, args.repeats),
        ),
        (
            f"{classes:,} of {large_count // classes:,}",
            measure(large_count, cfg, large_count // classes, args.planted, args.repeats),
        ),
    ]
    for _, row in rows:
        print(row)
    base = rows[0][1]["seconds"]
    exponent = lambda r: (
        math.log(r["seconds"] / base)
        / math.log(  # noqa: E731
            r["count"] / small_count
        )
    )
    table = "\n".join(
        f"| {r['count']:,} | {classes_text} | {r['seconds']:.1f} | "
        f"{'-' if r['count'] == small_count else f'**{exponent(r):.2f}**'} | "
        f"{r['compared'] / r['count']:.0f} | {r['hash_close'] / r['count']:.1f} | "
        f"{r['embedding_close']:,} | {r['recall']:.4f} | {r['other_pairs']:,} |"
        for classes_text, r in rows
    )
    cores = len(os.sched_getaffinity(0))
    sort_exponent = 1 + math.log(math.log(large_count) / math.log(small_count)) / math.log(
        large_count / small_count
    )
    columns = [
        "samples",
        "classes",
        "seconds",
        "growth exponent",
        "compared / sample",
        "hash-close / sample",
        "close pairs",
        "recall (planted)",
        "other pairs in groups",
    ]
    section = f"""{SECTION}

`dedup.find_groups` on synthetic precomputed fingerprints (see the tool's docstring):
{cfg.embedding_size**2}-d embeddings around class centres, 64-bit hashes,
{args.planted:.0%} of the samples planted near copies; the defaults of `{args.config}`
({cfg.bands} hash-band keys + {cfg.projection_tables} random-hyperplane keys, window
{cfg.window}, Hamming <= {cfg.max_hamming}, cosine >= {cfg.min_cosine}). The fingerprints are
given, so neither the fingerprinting pass nor the final pixel check is timed (docs/RESULTS.md
times the whole command on the built-in pool). {platform.machine()}, {cores} CPU cores
(shared with other jobs: expect noise), the median of {args.repeats} runs each. The growth
exponent is
log(t / t_{small_count:,}) / log(N / {small_count:,}): 1 is linear, 2 all pairs; a sort alone
grows as N log N, {sort_exponent:.2f} over this range.

| {" | ".join(columns)} |
|{"---|" * len(columns)}
{table}

The pairs compared per sample are fixed (keys x window) and the sorts grow as N log N, so beyond
the sorts the time per sample depends on the data, not on N: on how many compared pairs have
hashes close enough to go on to the cosine (hash-close / sample; with more classes, fewer of a
sample's sort neighbours are classmates; with denser classes, more are) and on memory traffic
(each key's pass gathers the N x {cfg.embedding_size**2} float32 embeddings,
{large_count * cfg.embedding_size**2 * 4 / 2**20:,.0f} MiB at {large_count:,} samples, into its
sort order, block by block). An exponent below 1 means that the work per sample fell, not that
the search is sublinear.

Command: `python tools/bench_dedup.py --sizes {small_count} {large_count}`.
"""
    write_section(args.out, SECTION, section, "Benchmarks")


if __name__ == "__main__":
    main()
