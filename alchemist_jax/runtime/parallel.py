"""Devices: the mesh every step is jitted on, and what a batch carries to the models.

Today's mesh is 1-D: axis `data` over every device, batches split over it, parameters
replicated. Axis types are Auto (jax >= 0.10's `make_mesh` defaults to Explicit, under which a
weighted loss contracting over a data-sharded batch fails): shardings are hints to the compiler.
"""

from __future__ import annotations

import jax
import numpy as np

DATA_AXIS = "data"
# The caption fields of a batch (token ids + mask, or precomputed text embeddings).
CAPTION_INPUTS = ("tokens", "token_mask", "text_embedding")
# Batch fields the models read; everything else (ids, labels, masks) stays on the host.
MODEL_INPUTS = ("image", "latent", *CAPTION_INPUTS)


def make_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh over every device, axis `data` (Auto axis types: shardings are hints)."""
    return jax.make_mesh(
        (jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
    )


def model_inputs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The fields of a batch the models read (`MODEL_INPUTS`); ids, labels, masks stay out."""
    return {key: value for key, value in batch.items() if key in MODEL_INPUTS}


def check_batch_split(sizes: dict[str, int]) -> None:
    """Each batch size (config key -> size) must split evenly over the devices of the mesh.

    Raises:
      ValueError: names the first key whose size does not divide.
    """
    devices = jax.device_count()
    for key, size in sizes.items():
        if size % devices:
            raise ValueError(f"{key}={size} must be divisible by the {devices} devices of the mesh")
