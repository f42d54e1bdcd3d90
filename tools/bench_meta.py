"""Benchmark of the meta-gradient engine on the `tiny` DiT, written to docs/BENCHMARKS.md.

Measured side by side in one run (the machines are shared and noisy, so ratios matter):
  1. time of one `unrolled` meta-step with K inner steps / time of K plain weighted train steps,
     K in {1, 2, 4, 8} (target <= 3.5);
  2. XLA temporary memory (`compiled.memory_analysis().temp_size_in_bytes`) for K in {1, 4, 16}
     without remat, with remat and with the mixed-mode VJP (target: K=16 / K=1 <= 2.0 with remat);
  3. compile time of the meta-step.

The model and rater are those of the config (default configs/demo.yaml: the demo's tiny DiT).

Usage: python tools/bench_meta.py [--config configs/demo.yaml] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alchemist_jax import meta, models
from alchemist_jax.config import load_config
from markdown_sections import write_section

SECTION = "## Meta-gradient engine (`tools/bench_meta.py`)"


def _batch(batch_size: int, text_length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.uniform(-1, 1, (batch_size, 28, 28, 1)).astype(np.float32),
            "tokens": rng.integers(0, 49406, (batch_size, text_length)).astype(np.int32),
            "token_mask": np.ones((batch_size, text_length), bool)}


def _stack(batch: dict, k: int) -> dict:
    return {key: np.stack([value] * k) for key, value in batch.items()}


def _time(compiled, args, repeats: int) -> float:
    """Median seconds of `repeats` calls (after one warm-up)."""
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--repeats", type=int, default=5)
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
    inner_opt = meta.default_inner_optimizer(cfg.rate.inner_lr)
    opt_state = inner_opt.init(proxy)

    def train_steps(params, opt_state, batches, rng):
        """K plain weighted train steps (the rater's weights, no meta-gradient)."""
        def step(carry, inputs):
            params, opt_state = carry
            batch, index = inputs
            weights = jax.lax.stop_gradient(rater_fn(rater, batch))
            grads = jax.grad(lambda p: jnp.mean(
                weights * loss_fn(p, batch, jax.random.fold_in(rng, index))))(params)
            updates, opt_state = inner_opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        k = jax.tree.leaves(batches)[0].shape[0]
        return jax.lax.scan(step, (params, opt_state), (batches, jnp.arange(k)))[0]

    def meta_step(rater, params, opt_state, batches, val_batch, rng, remat="full",
                  mixed_mode=False):
        return meta.meta_gradient(rater, params, opt_state, batches, val_batch, rng,
                                  rater_fn=rater_fn, loss_fn=loss_fn, inner_opt=inner_opt,
                                  remat=remat, mixed_mode=mixed_mode)

    rows_time, rows_memory = [], []
    for k in (1, 2, 4, 8):
        batches = _stack(batch, k)
        start = time.perf_counter()
        meta_compiled = jax.jit(meta_step).lower(rater, proxy, opt_state, batches, batch,
                                                 key).compile()
        compile_s = time.perf_counter() - start
        train_compiled = jax.jit(train_steps).lower(proxy, opt_state, batches, key).compile()
        meta_s = _time(meta_compiled, (rater, proxy, opt_state, batches, batch, key),
                       args.repeats)
        train_s = _time(train_compiled, (proxy, opt_state, batches, key), args.repeats)
        rows_time.append((k, meta_s * 1e3, train_s * 1e3, meta_s / train_s, compile_s))
        print(f"K={k}: meta {meta_s*1e3:.1f} ms, {k} train steps {train_s*1e3:.1f} ms, "
              f"ratio {meta_s/train_s:.2f}, compile {compile_s:.1f} s", flush=True)

    for k in (1, 4, 16):
        batches = _stack(batch, k)
        row = [k]
        for remat, mixed in (("none", False), ("full", False), ("full", True)):
            lowered = jax.jit(lambda *a: meta_step(*a, remat=remat, mixed_mode=mixed)).lower(
                rater, proxy, opt_state, batches, batch, key)
            row.append(lowered.compile().memory_analysis().temp_size_in_bytes / 2**20)
        rows_memory.append(row)
        print(f"K={k}: temp MiB none {row[1]:.1f}, remat {row[2]:.1f}, mixed {row[3]:.1f}",
              flush=True)

    write_report(args, rows_time, rows_memory, models.count_params(proxy),
                 models.count_params(rater))


def write_report(args, rows_time, rows_memory, proxy_params: int, rater_params: int) -> None:
    base = rows_memory[0]
    lines = [
        SECTION, "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), jax {jax.__version__}; "
        f"the DiT and rater of `{args.config}` ({proxy_params:,} trainable proxy parameters, "
        f"28x28x1, {args.text_length} tokens; rater {rater_params:,} parameters), batch "
        f"{args.batch}, validation batch = batch, inner Adam (eps 1e-3, eps_root 1e-12), "
        f"median of {args.repeats}. Command: `python tools/bench_meta.py --config "
        f"{args.config}`.", "",
        "| K | meta-step (ms) | K train steps (ms) | ratio (target <= 3.5) | compile (s) |",
        "|---|---|---|---|---|",
        *[f"| {k} | {m:.1f} | {t:.1f} | {r:.2f} | {c:.1f} |" for k, m, t, r, c in rows_time],
        "",
        "XLA temporary memory of the meta-step (MiB) and growth relative to K=1:", "",
        "| K | no remat | remat (default) | remat + mixed-mode VJP |", "|---|---|---|---|",
        *[f"| {k} | {a:.1f} ({a / base[1]:.2f}x) | {b:.1f} ({b / base[2]:.2f}x) | "
          f"{c:.1f} ({c / base[3]:.2f}x) |" for k, a, b, c in rows_memory],
        "",
    ]
    write_section(args.out, SECTION, "\n".join(lines), "Benchmarks")


if __name__ == "__main__":
    main()
