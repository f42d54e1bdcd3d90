"""Ahead-of-time compile of the rating meta-step on 8 fake CPU devices: the compiler's per-device
memory for a large preset (default `xl`, DiT-XL/2) on meshes with and without FSDP.

Nothing runs and no parameter is materialised on a device: the meta-step is lowered with abstract
inputs (`jax.ShapeDtypeStruct`s carrying the program's shardings), compiled, and
`compiled.memory_analysis()` reports the partitioned (per-device) sizes: arguments (the state and
batches this device holds), outputs, aliased (donated) bytes and XLA temporaries. Peak per
device ~ arguments + outputs - aliased + temporaries.

It also compiles the meta-step of one preset (default `base`) at two depths (default 4 and 12)
on the first mesh, side by side in the same run: the DiT's blocks are one scanned module
(`models.stacked`), so the compile time should not grow with depth.

    .venv/bin/python tools/aot_memory.py                          # xl, writes docs/BENCHMARKS.md
    .venv/bin/python tools/aot_memory.py --preset small --no-write --depths ""

Inputs: SD-VAE latents (B, 32, 32, 4) (256 x 256 images) and precomputed CLIP-L text embeddings
(B, 77, 768), so the proxy is the DiT alone (no text encoder in it), P proxies of K inner steps.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from alchemist_jax import models, rating  # noqa: E402
from alchemist_jax.config import load_config  # noqa: E402
from alchemist_jax.runtime import parallel  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from markdown_sections import write_section  # noqa: E402

HEADING = "## Meta-step memory per device, ahead-of-time on 8 fake devices (`tools/aot_memory.py`)"
# (data, fsdp, population) of the 8 devices: without FSDP first.
MESHES = ((8, 1, 1), (1, 1, 8), (1, 8, 1), (2, 4, 1), (1, 4, 2))
GIB = 2**30


def abstract(tree, shardings):
    """`jax.ShapeDtypeStruct`s of `tree`'s leaves carrying `shardings` (a prefix tree)."""
    return jax.tree.map(
        lambda s, x: jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), x
        ),
        shardings,
        tree,
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
    )


def measure(
    preset: str,
    mesh_sizes,
    population: int,
    inner: int,
    batch: int,
    depth: int | None = None,
    block_remat: str = "none",
) -> dict:
    """Compiles the meta-step of `preset` (with `depth` DiT blocks, None: the preset's; each block
    checkpointed by `block_remat`) on `mesh_sizes`; the per-device sizes in bytes, and the
    seconds of lowering + compiling."""
    data, fsdp, pop = mesh_sizes
    cfg = load_config(
        None,
        [
            f"model.preset={preset}",
            f"model.depth={'null' if depth is None else depth}",
            f"model.block_remat={block_remat}",
            f"rate.population={population}",
            f"rate.inner_steps={inner}",
            f"data.batch_size={batch}",
            f"rate.val_batch_size={batch}",
            f"mesh.data={data}",
            f"mesh.fsdp={fsdp}",
            f"mesh.population={pop}",
        ],
    )
    example = {
        "latent": np.zeros((batch, 32, 32, 4), np.float32),
        "text_embedding": np.zeros((batch, 77, 768), np.float32),
        "token_mask": np.ones((batch, 77), bool),
    }
    mesh = parallel.make_mesh(cfg.mesh)
    program = rating.build_program(cfg, example, mesh)
    state = abstract(jax.eval_shape(program.init_state, jax.random.key(0)), program.state_sharding)
    proxies = models.count_params(state["proxy"]) // population
    train = {
        k: jax.ShapeDtypeStruct(
            (population, inner, *v.shape), v.dtype, sharding=program.train_sharding
        )
        for k, v in example.items()
    }
    val = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=program.val_sharding)
        for k, v in example.items()
    }
    start = time.perf_counter()
    compiled = program.meta_step.lower(state, train, val, np.float32(1.0)).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    sizes = {
        "arguments": memory.argument_size_in_bytes,
        "outputs": memory.output_size_in_bytes,
        "aliased": memory.alias_size_in_bytes,
        "temporaries": memory.temp_size_in_bytes,
    }
    sizes["peak"] = sizes["arguments"] + sizes["outputs"] - sizes["aliased"] + sizes["temporaries"]
    return {**sizes, "proxy_params": proxies, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="xl")
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--inner-steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="rows per proxy and inner step")
    parser.add_argument("--meshes", default=";".join(",".join(map(str, m)) for m in MESHES))
    parser.add_argument("--depth-preset", default="base", help="preset of the depth comparison")
    parser.add_argument(
        "--depths", default="4,12", help="DiT depths to compile side by side ('': skip)"
    )
    parser.add_argument(
        "--block-remat",
        default="none",
        help="model.block_remat of the memory table (not none: a section of its own)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    meshes = [tuple(int(n) for n in m.split(",")) for m in args.meshes.split(";")]
    depths = [int(d) for d in args.depths.split(",") if d]
    compile_seconds = {}
    for depth in depths:
        result = measure(
            args.depth_preset, meshes[0], args.population, args.inner_steps, args.batch, depth
        )
        compile_seconds[depth] = result["seconds"]
        print(
            f"{args.depth_preset} depth {depth}: compiled in {result['seconds']:.1f} s", flush=True
        )
    rows = []
    for mesh in meshes:
        result = measure(
            args.preset,
            mesh,
            args.population,
            args.inner_steps,
            args.batch,
            block_remat=args.block_remat,
        )
        rows.append((mesh, result))
        print(
            f"mesh {mesh}: peak {result['peak'] / GIB:.2f} GiB per device "
            f"(arguments {result['arguments'] / GIB:.2f}, temporaries "
            f"{result['temporaries'] / GIB:.2f}), compiled in {result['seconds']:.0f} s",
            flush=True,
        )
    params = rows[0][1]["proxy_params"]
    heading = HEADING
    if args.block_remat != "none":
        heading += f", `model.block_remat={args.block_remat}`"
    lines = [
        heading,
        "",
        f"Measured {datetime.date.today().isoformat()}, jax {jax.__version__}, on the shared "
        f"2-core CPU of the session. Preset `{args.preset}` ({params / 1e6:.0f}M parameters "
        f"per proxy DiT, its blocks scanned), population P={args.population}, "
        f"K={args.inner_steps} unrolled inner steps, {args.batch} rows per proxy and step, "
        "latents 32x32x4 and precomputed 77x768 text embeddings, float32, meta-step remat "
        f"`full`, block remat `{args.block_remat}` (`model.block_remat`). The meta-step "
        "compiled for 8 fake CPU devices; the numbers "
        "are the compiler's per-device bytes (`compiled.memory_analysis()`), nothing ran; peak "
        "= arguments + outputs - aliased (donated state) + temporaries. Compile s: lowering + "
        "XLA compile of the meta-step. Command: "
        f"`.venv/bin/python tools/aot_memory.py --preset {args.preset} --population "
        f"{args.population} --inner-steps {args.inner_steps} --batch {args.batch} --meshes "
        f"'{args.meshes}' --depth-preset {args.depth_preset} --depths '{args.depths}' "
        f"--block-remat {args.block_remat}`.",
        "",
        "| mesh (data, fsdp, population) | FSDP | arguments GiB | temporaries GiB | "
        "peak GiB / device | compile s |",
        "|---|---|---|---|---|---|",
    ]
    for mesh, r in rows:
        lines.append(
            f"| {mesh} | {'yes' if mesh[1] > 1 else 'no'} | {r['arguments'] / GIB:.2f} | "
            f"{r['temporaries'] / GIB:.2f} | {r['peak'] / GIB:.2f} | {r['seconds']:.0f} |"
        )
    lines += [
        "",
        "An H100 has 80 GB (74.5 GiB usable by XLA at the default 0.75 preallocation: 60 GiB). "
        "Without FSDP each device holds whole proxies with their Adam moments and warm-start "
        "copies (all P of them on a pure `data` mesh, P/8 with `population`=8); FSDP splits "
        "every one of those arrays 8 ways.",
    ]
    if compile_seconds:
        lines += [
            "",
            f"Compile time against depth (`{args.depth_preset}` meta-step, mesh {meshes[0]}, "
            "same run): "
            + ", ".join(f"depth {d}: {s:.0f} s" for d, s in compile_seconds.items())
            + ".",
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section(
            Path(__file__).parents[1] / "docs" / "BENCHMARKS.md", heading, text, "Benchmarks"
        )


if __name__ == "__main__":
    main()
