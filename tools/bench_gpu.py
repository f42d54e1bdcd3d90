"""Accelerator benchmark of the rating and training steps (run by tools/gpu_check.sh).

    .venv/bin/python tools/bench_gpu.py          # `base` preset, float32, default device
    .venv/bin/python tools/bench_gpu.py --cpu    # the same, tiny, on the CPU (smoke test)

Measures, on one device, for the DiT of `--preset` on 32x32x4 latents with precomputed 77x768
caption embeddings, computed in `--compute-dtype` (default bfloat16: `model.compute_dtype` and
`rater.compute_dtype`, float32 weights and optimizer states; float32 with `--cpu`):
  train      downstream train-step throughput (samples/s) and model-FLOPs utilisation: the
             compiled step's FLOPs (XLA cost analysis) / time / the device's peak (`--peak-tflops`;
             default: the dense bf16 peak of a known card, none on CPU)
  meta K     one meta-step of K unrolled inner steps (P=1 proxy) over K plain proxy steps
             (targets: <= 3.5x)
  scoring    rater scores of host batches (transfer included) over the pure forward of
             device-resident batches (target >= 0.9)
  memory     peak device memory (`memory_stats()`, GPU/TPU only)
Prints a table at the end; `--log FILE` also writes everything printed there.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from alchemist_jax import rating, training
from alchemist_jax.config import load_config
from alchemist_jax.runtime import parallel

# Dense bf16 peak TFLOP/s by device kind (the MFU denominator when --peak-tflops is not given).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "TPU v5e": 197.0}


def timed(fn, *args, repeats: int) -> float:
    """Seconds per call of `fn(*args)` (first call = compile + warm-up, not counted)."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def inputs(batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "latent": rng.standard_normal((batch, 32, 32, 4)).astype(np.float32),
        "text_embedding": rng.standard_normal((batch, 77, 768)).astype(np.float32),
        "token_mask": np.ones((batch, 77), bool),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny preset on the CPU")
    parser.add_argument(
        "--compute-dtype",
        choices=("bfloat16", "float32"),
        default=None,
        help="model.compute_dtype / rater.compute_dtype (default: bfloat16; float32 with --cpu)",
    )
    parser.add_argument("--preset", default=None, help="default: base (tiny with --cpu)")
    parser.add_argument("--batch", type=int, default=None, help="default 64 (8 with --cpu)")
    parser.add_argument("--repeats", type=int, default=None, help="default 20 (3 with --cpu)")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--log", type=Path, default=None)
    args = parser.parse_args()
    if args.cpu:
        jax.config.update("jax_platforms", "cpu")
    preset = args.preset or ("tiny" if args.cpu else "base")
    dtype = args.compute_dtype or ("float32" if args.cpu else "bfloat16")
    precision = [f"model.compute_dtype={dtype}", f"rater.compute_dtype={dtype}"]
    batch = args.batch or (8 if args.cpu else 64)
    repeats = args.repeats or (3 if args.cpu else 20)
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    say(
        f"device: {kind} ({device.platform}), jax {jax.__version__}, preset {preset}, "
        f"batch {batch}, compute {dtype} (weights float32)"
    )
    mesh = parallel.make_mesh(None, [device])
    rng = np.random.default_rng(0)
    example = inputs(batch, rng)
    rows: list[tuple[str, str, str]] = []

    # ---- downstream train step ----------------------------------------------------------------
    cfg = load_config(None, [f"model.preset={preset}", f"train.batch_size={batch}", *precision])
    program = training.build_program(
        cfg, training.input_spec({k: v[0] for k, v in example.items()}), mesh, 1000, 0
    )
    device_batch = jax.device_put(example, program.batch_sharding)
    state = program.initial_state

    seconds = _chain(program.train_step, state, (device_batch,), repeats)
    # XLA's FLOP count of the compiled step (forward + backward + AdamW).
    cost = jax.jit(program.train_step).lower(state, device_batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0))
    mfu = f"{flops / seconds / (peak * 1e12):.1%}" if peak and flops else "n/a (no peak)"
    rows.append(
        (
            "train step",
            f"{batch / seconds:.1f} samples/s ({seconds * 1e3:.1f} ms)",
            f"MFU {mfu}, {flops / 1e9:.1f} GFLOP/step",
        )
    )

    # ---- meta-step over K proxy steps ---------------------------------------------------------
    for k in (2, 4):
        rate_cfg = load_config(
            None,
            [
                f"model.preset={preset}",
                *precision,
                "rate.population=1",
                f"rate.inner_steps={k}",
                f"data.batch_size={batch}",
                f"rate.val_batch_size={batch}",
            ],
        )
        rate_program = rating.build_program(rate_cfg, example, mesh)
        rate_state = rate_program.init_state(jax.random.key(0))
        train = {key: np.broadcast_to(v, (1, k, *v.shape)) for key, v in example.items()}
        train = jax.device_put(train, rate_program.train_sharding)
        val = jax.device_put(example, rate_program.val_sharding)
        meta = _chain(
            rate_program.meta_step, rate_state, (train, val, np.float32(1.0)), max(1, repeats // k)
        )
        plain = _chain(rate_program.proxy_steps, rate_state, (train, True), max(1, repeats // k))
        rows.append(
            (
                f"meta-step K={k}",
                f"{meta * 1e3:.1f} ms",
                f"{meta / plain:.2f}x {k} proxy steps ({plain * 1e3:.1f} ms)",
            )
        )

    # ---- scoring over pure forward ------------------------------------------------------------
    forward = timed(rate_program.score, rate_state["rater_ema"], val, repeats=repeats)
    host = timed(rate_program.score, rate_state["rater_ema"], example, repeats=repeats)
    rows.append(
        (
            "scoring",
            f"{batch / host:.0f} samples/s",
            f"{forward / host:.2f} of pure forward ({batch / forward:.0f} samples/s)",
        )
    )

    stats = device.memory_stats() or {}
    peak_bytes = stats.get("peak_bytes_in_use")
    rows.append(("peak memory", f"{peak_bytes / 2**30:.2f} GiB" if peak_bytes else "n/a (CPU)", ""))
    say("")
    say("| measure | value | relative |")
    say("|---|---|---|")
    for row in rows:
        say("| " + " | ".join(row) + " |")
    if args.log:
        args.log.parent.mkdir(parents=True, exist_ok=True)
        args.log.write_text("\n".join(lines) + "\n")


def _chain(step, state, extra, repeats: int) -> float:
    """Seconds per call of a state-donating `step(state, *extra) -> (state, ...)`, chained."""
    state = jax.tree.map(jnp.copy, state)
    state = step(state, *extra)[0]  # compile + warm-up
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(repeats):
        state = step(state, *extra)[0]
    jax.block_until_ready(state)
    return (time.perf_counter() - start) / repeats


if __name__ == "__main__":
    sys.exit(main())
