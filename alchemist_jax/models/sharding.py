"""Logical axis names of the models' parameters (NNX sharding metadata).

Every parameter of the DiT, its text encoder and the rater names what each of its dimensions is;
`config.MeshConfig.rules` maps these names to mesh axes and `runtime.parallel.logical_shardings`
turns them into `NamedSharding`s (MaxText / MaxDiffusion style: the model says what a dimension
is, the config says where it goes):

  embed   the residual-stream width D (DiT, text encoder) or the rater's feature width
  mlp     hidden features: MLP hidden layers, adaLN modulation outputs, projections' inputs
  heads   attention features H * Dh (query / key / value outputs, output-projection input)
  vocab   rows of a token table (CLIP vocabulary)
  layers  the leading axis of a stack of identical blocks (`models.stacked`: created by
          `nnx.vmap`, applied by `nnx.scan`); the default rules replicate it (every device
          holds every layer of the slice of the other dimensions it owns)
  None    a dimension that is never split (conv windows, patch pixels, position rows)

The names ride on the `nnx.Param` as its `out_sharding` metadata (`kernel_metadata=` /
`bias_metadata=` of `nnx.Linear` / `nnx.Conv`, keyword metadata of `nnx.Param`), so they follow
the parameter through `nnx.split`, `jax.vmap` stacking, dtype casts and optax states (the Adam
moments are trees of the same `nnx.Param`s). `eager_sharding=False` keeps them metadata only:
flax 0.12 would otherwise shard each variable as it is created, which needs a mesh in context at
every `init` (including inside `jax.vmap` and `jax.eval_shape`); we shard whole states instead,
with explicit `in_shardings` / `out_shardings` on the jitted steps.
"""

from __future__ import annotations

from typing import Any

LAYERS = "layers"
LOGICAL_AXES = ("embed", "mlp", "heads", "vocab", LAYERS)


def axes(*names: str | None) -> dict[str, Any]:
    """NNX variable metadata naming a parameter's dimensions, e.g. `axes("embed", "mlp")` for a
    (D, hidden) kernel; pass as `kernel_metadata=` / `bias_metadata=` or `nnx.Param(x, **...)`."""
    unknown = [name for name in names if name is not None and name not in LOGICAL_AXES]
    if unknown:
        raise ValueError(f"unknown logical axes {unknown}; known: {', '.join(LOGICAL_AXES)}")
    return {"out_sharding": tuple(names), "eager_sharding": False}


def linear(inputs: str | None, outputs: str | None) -> dict[str, Any]:
    """Keyword arguments of an `nnx.Linear`: kernel (inputs, outputs), bias (outputs,)."""
    return {"kernel_metadata": axes(inputs, outputs), "bias_metadata": axes(outputs)}
