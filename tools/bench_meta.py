"""Benchmark of the meta-gradient engine on the `tiny` DiT, written to docs/BENCHMARKS.md.

Every variant of the `unrolled` meta-step (remat "none", "dots", "full", "nested"; the mixed-mode
VJP alone and with nested remat; "full" and mixed with the K inner steps unrolled into one
straight-line program) is measured side by side in one run, since the machines are shared and
noisy:
  1. time of one meta-step with K inner steps / time of K plain weighted train steps, K in
     {1, 2, 4, 8} (target <= 3.5): the repeats are interleaved (train steps, then each variant)
     and the ratio is the median of the repeats' ratios, against the faster of the two train
     programs (K steps in a `lax.scan`, or unrolled) in each repeat;
  2. XLA temporary memory (`compiled.memory_analysis().temp_size_in_bytes`) for K in
     {1, 2, 4, 8, 16} (target: K=16 / K=1 <= 2.0 with remat; the unrolled-scan variants up to
     K=8 only, their K=16 program takes ~10 minutes to compile), and its growth K=16 / K=1 at
     larger batches for the remat variants (`--memory-batches`);
  3. compile time of each meta-step.

The model and rater are those of the config (default configs/demo.yaml: the demo's tiny DiT).

Usage: python tools/bench_meta.py [--config configs/demo.yaml] [--repeats 7]
                                  [--memory-batches 64 256]
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from markdown_sections import write_section
from tqdm import tqdm

from alchemist_jax import meta, models
from alchemist_jax.config import load_config

SECTION = "## Meta-gradient engine (`tools/bench_meta.py`)"
# name -> (remat, mixed_mode, unroll)
VARIANTS = {
    "none": ("none", False, 1),
    "dots": ("dots", False, 1),
    "full": ("full", False, 1),
    "nested": ("nested", False, 1),
    "mixed": ("full", True, 1),
    "mixed + nested": ("nested", True, 1),
    "full + unroll": ("full", False, True),
    "mixed + unroll": ("full", True, True),
}
TIME_KS = (1, 2, 4, 8)
MEMORY_KS = (1, 2, 4, 8, 16)
BATCH_GROWTH_VARIANTS = ("full", "nested", "mixed + nested")
TARGET_RATIO, TARGET_GROWTH = 3.5, 2.0


def _batch(batch_size: int, text_length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.uniform(-1, 1, (batch_size, 28, 28, 1)).astype(np.float32),
        "tokens": rng.integers(0, 49406, (batch_size, text_length)).astype(np.int32),
        "token_mask": np.ones((batch_size, text_length), bool),
    }


def _stack(batch: dict, k: int) -> dict:
    return {key: np.stack([value] * k) for key, value in batch.items()}


def _interleaved_times(programs: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each (compiled, args) in `programs` over `repeats` rounds, one call of every
    program per round (after one warm-up call each), so that load changes hit all alike."""
    for compiled, args in programs.values():
        jax.block_until_ready(compiled(*args))
    times = {name: [] for name in programs}
    for _ in range(repeats):
        for name, (compiled, args) in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--memory-batches",
        type=int,
        nargs="*",
        default=[64, 256],
        help="larger batches at which to measure memory growth K=16 / K=1",
    )
    parser.add_argument("--out", type=Path, default=Path("docs/BENCHMARKS.md"))
    args = parser.parse_args()
    cfg = load_config(args.config)
    args.batch, args.text_length = cfg.data.batch_size, cfg.data.max_text_length

    batch = _batch(args.batch, args.text_length, 0)
    key = jax.random.key(0)
    proxy_graph, proxy, proxy_rest = models.init_proxy(cfg.model, batch, key, args.text_length)
    rater_graph, rater, rater_rest = models.init_rater(cfg.rater, batch, key, args.text_length)
    loss_fn = models.proxy_loss_fn(proxy_graph, proxy_rest, cfg.model.caption_dropout)
    rater_fn = models.rater_weight_fn(rater_graph, rater_rest, cfg.rater.temperature)
    inner_opt = meta.inner_optimizer(cfg.rate.inner_lr, cfg.rate.inner_eps)
    opt_state = inner_opt.init(proxy)

    def train_steps(params, opt_state, batches, rng, unroll):
        """K plain weighted train steps (the rater's weights, no meta-gradient)."""

        def step(carry, inputs):
            params, opt_state = carry
            batch, index = inputs
            weights = jax.lax.stop_gradient(rater_fn(rater, batch))
            grads = jax.grad(
                lambda p: jnp.mean(weights * loss_fn(p, batch, jax.random.fold_in(rng, index)))
            )(params)
            updates, opt_state = inner_opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        k = jax.tree.leaves(batches)[0].shape[0]
        return jax.lax.scan(step, (params, opt_state), (batches, jnp.arange(k)), unroll=unroll)[0]

    def compile_meta_step(name, k, meta_batch):
        remat, mixed_mode, unroll = VARIANTS[name]
        meta_args = (rater, proxy, opt_state, _stack(meta_batch, k), meta_batch, key)
        compiled = (
            jax.jit(
                lambda *a: meta.meta_gradient(
                    *a,
                    rater_fn=rater_fn,
                    loss_fn=loss_fn,
                    inner_opt=inner_opt,
                    remat=remat,
                    mixed_mode=mixed_mode,
                    unroll=unroll,
                )
            )
            .lower(*meta_args)
            .compile()
        )
        return compiled, meta_args

    def measured(name, k):  # the unrolled-scan variants up to max(TIME_KS) only
        return VARIANTS[name][2] is not True or k in TIME_KS

    ratios, millis, memory, compile_s, batch_growth = {}, {}, {}, {}, {}
    ks = sorted(set(TIME_KS) | set(MEMORY_KS))
    total = sum(measured(name, k) for k in ks for name in VARIANTS)
    total += 2 * len(args.memory_batches) * len(BATCH_GROWTH_VARIANTS)
    with tqdm(total=total, desc="compiling meta-steps") as bar:
        for k in ks:
            programs = {}
            for name in VARIANTS:
                if not measured(name, k):
                    continue
                start = time.perf_counter()
                programs[name] = compile_meta_step(name, k, batch)
                compile_s[k, name] = time.perf_counter() - start
                memory[k, name] = programs[name][0].memory_analysis().temp_size_in_bytes / 2**20
                bar.update()
            if k not in TIME_KS:
                continue
            train_args = (proxy, opt_state, _stack(batch, k), key)
            trains = {
                f"train{suffix}": (
                    jax.jit(functools.partial(train_steps, unroll=unroll))
                    .lower(*train_args)
                    .compile(),
                    train_args,
                )
                for suffix, unroll in (("", 1), (" unrolled", True))
            }
            times = _interleaved_times({**trains, **programs}, args.repeats)
            fastest_train = [min(pair) for pair in zip(times["train"], times["train unrolled"])]
            for name, seconds in times.items():
                millis[k, name] = statistics.median(seconds) * 1e3
                ratios[k, name] = statistics.median(s / t for s, t in zip(seconds, fastest_train))
            tqdm.write(f"K={k}: " + ", ".join(f"{name} {ratios[k, name]:.2f}" for name in VARIANTS))
        for name in BATCH_GROWTH_VARIANTS:
            for k in (MEMORY_KS[0], MEMORY_KS[-1]):
                batch_growth[args.batch, name, k] = memory[k, name]
        for batch_size in args.memory_batches:
            large_batch = _batch(batch_size, args.text_length, 0)
            for name in BATCH_GROWTH_VARIANTS:
                for k in (MEMORY_KS[0], MEMORY_KS[-1]):
                    compiled, _ = compile_meta_step(name, k, large_batch)
                    batch_growth[batch_size, name, k] = (
                        compiled.memory_analysis().temp_size_in_bytes / 2**20
                    )
                    bar.update()

    write_report(
        args,
        ratios,
        millis,
        memory,
        compile_s,
        batch_growth,
        models.count_params(proxy),
        models.count_params(rater),
    )


def write_report(
    args, ratios, millis, memory, compile_s, batch_growth, proxy_params: int, rater_params: int
) -> None:
    """Rewrites this benchmark's section of `args.out` with the four tables."""
    names = list(VARIANTS)
    header = "| K | " + " | ".join(names) + " |"
    rule = "|---" * (len(names) + 1) + "|"

    def ratio_cell(k, name):
        text = f"{ratios[k, name]:.2f} ({millis[k, name]:.0f} ms)"
        return f"**{text}**" if ratios[k, name] <= TARGET_RATIO else text

    def memory_cell(k, name):
        if (k, name) not in memory:
            return "—"
        growth = memory[k, name] / memory[MEMORY_KS[0], name]
        text = f"{memory[k, name]:.1f} ({growth:.2f}x)"
        return f"**{text}**" if growth <= TARGET_GROWTH and name != "none" else text

    groups = ", ".join(f"K={k}: G={meta.nested_group_count(k)}" for k in MEMORY_KS)
    lines = [
        SECTION,
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), jax {jax.__version__}; "
        f"the DiT and rater of `{args.config}` ({proxy_params:,} trainable proxy parameters, "
        f"28x28x1, {args.text_length} tokens; rater {rater_params:,} parameters), batch "
        f"{args.batch}, validation batch = batch, inner Adam (eps 1e-3, eps_root 1e-12), "
        f'{args.repeats} interleaved repeats. Columns: `remat` policy; "mixed" is '
        f'`mixed_mode=True` (its custom VJP keeps each step\'s inputs, as "full"); "nested" '
        f'checkpoints G groups of K/G steps ({groups}); "+ unroll" is `unroll=True` (the K '
        f"inner steps as one straight-line program instead of a `lax.scan` loop). The ratio's "
        f"denominator is the faster of K train steps in a scan or unrolled. Command: "
        f"`python tools/bench_meta.py --config {args.config}`.",
        "",
        f"Time of one `unrolled` meta-step / time of K plain weighted train steps (median of the "
        f"repeats' ratios; median meta-step time in brackets; bold: target <= {TARGET_RATIO} "
        f"met):",
        "",
        "| K | K train steps (scan / unrolled) | " + " | ".join(names) + " |",
        "|---" * (len(names) + 2) + "|",
        *[
            f"| {k} | {millis[k, 'train']:.0f} / {millis[k, 'train unrolled']:.0f} ms | "
            + " | ".join(ratio_cell(k, name) for name in names)
            + " |"
            for k in TIME_KS
        ],
        "",
        f"XLA temporary memory of the meta-step, MiB (growth relative to K=1; bold: target "
        f"<= {TARGET_GROWTH}x met with remat):",
        "",
        header,
        rule,
        *[
            f"| {k} | " + " | ".join(memory_cell(k, name) for name in names) + " |"
            for k in MEMORY_KS
        ],
        "",
        "Compile time of the meta-step (s):",
        "",
        header,
        rule,
        *[
            f"| {k} | "
            + " | ".join(
                f"{compile_s[k, name]:.0f}" if (k, name) in compile_s else "—" for name in names
            )
            + " |"
            for k in MEMORY_KS
        ],
        "",
    ]
    if args.memory_batches:
        k_low, k_high = MEMORY_KS[0], MEMORY_KS[-1]

        def growth_cell(batch_size, name):
            low, high = (batch_growth[batch_size, name, k] for k in (k_low, k_high))
            text = f"{low:.1f} → {high:.1f} ({high / low:.2f}x)"
            return f"**{text}**" if high / low <= TARGET_GROWTH else text

        lines += [
            f"XLA temporary memory at larger batches (training and validation batch), MiB, "
            f"K={k_low} → K={k_high} (growth; bold: target <= {TARGET_GROWTH}x met):",
            "",
            "| batch | " + " | ".join(BATCH_GROWTH_VARIANTS) + " |",
            "|---" * (len(BATCH_GROWTH_VARIANTS) + 1) + "|",
            *[
                f"| {batch_size} | "
                + " | ".join(growth_cell(batch_size, name) for name in BATCH_GROWTH_VARIANTS)
                + " |"
                for batch_size in sorted({size for size, _, _ in batch_growth})
            ],
            "",
        ]
    write_section(args.out, SECTION, "\n".join(lines), "Benchmarks")


if __name__ == "__main__":
    main()
