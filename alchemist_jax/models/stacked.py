"""A stack of identical blocks: created at once along a leading `layers` axis, applied by a scan.

`stack_blocks` builds `depth` blocks with `nnx.vmap` over split RNG streams (the flax / MaxText
"scan over layers" layout): one module whose every parameter has a leading axis of size `depth`,
named `layers` in its sharding metadata (`models.sharding`). `scan_blocks` applies it with
`nnx.scan`, one block per iteration, so the program holds one block's computation whatever the
depth: compile time and program size do not grow with depth (docs/BENCHMARKS.md measures it).

`remat` (config `model.block_remat`, names `config.BLOCK_REMAT`) checkpoints each block of the
scan: "none" keeps its residuals for the backward pass, "full" keeps only its input and recomputes
the rest, "dots" keeps the matmul outputs without batch dimensions. Same numbers, different memory.

Both transforms run with `graph_updates=False`: the blocks hold parameters only (no state a call
changes), and the models are merged from traced parameters inside `jax.grad` of `jax.grad`, where
NNX's graph-update mode would refuse variables of an outer trace.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
from flax import nnx

from alchemist_jax.models.sharding import LAYERS

Block = TypeVar("Block", bound=nnx.Module)

# Policy of `jax.checkpoint` per name of `config.BLOCK_REMAT` (the same names, a test checks);
# None: no checkpoint.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_LAYERS_METADATA = {nnx.PARTITION_NAME: LAYERS}


def stack_blocks(make_block: Callable[[nnx.Rngs], Block], depth: int, rngs: nnx.Rngs) -> Block:
    """`depth` blocks `make_block(rngs)` as one module whose parameters are stacked (depth, ...),
    each block initialised from its own split of every stream of `rngs`."""

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_LAYERS_METADATA)
    def make(rngs: nnx.Rngs) -> Block:
        return make_block(rngs)

    return make(rngs)


def scan_blocks(blocks: nnx.Module, x: jax.Array, *args: jax.Array, remat: str) -> jax.Array:
    """x -> block_{depth-1}(... block_0(x, *args) ..., *args) over a `stack_blocks` stack.

    Args:
      blocks: stacked blocks; each maps (x, *args) -> an array of x's shape and dtype.
      x: the carry (e.g. the residual stream (B, N, D)).
      args: arrays every block sees unchanged (conditioning, context, masks).
      remat: a name of `config.BLOCK_REMAT` (module docstring).
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown block remat {remat!r}; valid: {', '.join(REMAT_POLICIES)}")

    def step(block: nnx.Module, x: jax.Array, *args: jax.Array) -> jax.Array:
        return block(x, *args)

    if REMAT_POLICIES[remat] is not None:
        # Inside a scan CSE cannot merge the recomputation with the forward pass anyway
        # (jax.checkpoint docs), so prevent_cse would only block optimisations.
        step = nnx.remat(step, policy=REMAT_POLICIES[remat], prevent_cse=False, graph_updates=False)
    scan = nnx.scan(
        step, in_axes=(0, nnx.Carry, *(None,) * len(args)), out_axes=nnx.Carry, graph_updates=False
    )
    return scan(blocks, x, *args)
