"""Trains a small diffusers-format AutoencoderKL on a source's images, for when no pretrained VAE
is at hand (e.g. the procedural `shapes` at 64 px), and writes a folder `load_vae` and
`alchemist-jax encode` read: config.json + diffusion_pytorch_model.safetensors (float32, torch
layout, diffusers' names).

    .venv/bin/python tools/train_vae.py --source shapes --split validation --out runs/vae64 \
        data.shapes.resolution=64 data.shapes.size=2000

The model is `alchemist_jax.models.vae.AutoencoderKL` itself (the module `load_vae` builds), so
the file is what diffusers would save for the same config. Loss: mean squared reconstruction error
of a posterior sample plus `--kl-weight` times the mean KL to N(0, I) per latent element; Adam
with cosine decay. After training, `scaling_factor` is set to 1 / std of the posterior means of
the training images (diffusers' convention: unit-variance stored latents) and the folder is
reloaded with `load_vae` to check that its encoder gives the trained model's latents.
Defaults: blocks (32, 64, 64) -> f = 4 (64 px -> 16 x 16 x 4 latents), no mid-block attention,
1,500 steps of 32 images: about 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.numpy
from flax import nnx, traverse_util

from alchemist_jax import config as config_lib
from alchemist_jax.data import load
from alchemist_jax.data.preprocess import resize_center_crop, to_unit_range
from alchemist_jax.models import vae as vae_lib
from alchemist_jax.models.clip import hf_key

log = logging.getLogger("train_vae")


def to_hf_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """NNX layout -> torch layout (the inverse of `clip.from_hf_layout`): Linear kernels
    (in, out) -> (out, in), convolution kernels (kh, kw, in, out) -> (out, in, kh, kw)."""
    if leaf == "kernel" and array.ndim == 2:
        return np.ascontiguousarray(array.T)
    if leaf == "kernel" and array.ndim == 4:
        return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
    return np.ascontiguousarray(array)


def diffusers_config(channels: tuple[int, ...], latent: int, groups: int, scaling: float) -> dict:
    """The config.json of a diffusers AutoencoderKL with these sizes."""
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.42.1",
        "act_fn": "silu",
        "block_out_channels": list(channels),
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "force_upcast": True,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": latent,
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": 1,
        "mid_block_add_attention": False,
        "norm_num_groups": groups,
        "sample_size": 64,
        "scaling_factor": scaling,
        "shift_factor": None,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
    }


def save_folder(out: Path, config: dict, params: nnx.State) -> None:
    """Writes config.json and diffusion_pytorch_model.safetensors (float32, torch layout)."""
    out.mkdir(parents=True, exist_ok=True)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(params))
    tensors = {
        hf_key(path): to_hf_layout(np.asarray(value, np.float32), str(path[-1]))
        for path, value in flat.items()
    }
    safetensors.numpy.save_file(tensors, str(out / f"{vae_lib.WEIGHTS_STEM}.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def images_of(source, resolution: int) -> np.ndarray:
    """float32 (N, R, R, 3) in [-1, 1]: every image of `source`, resized and center-cropped."""
    return np.stack(
        [
            to_unit_range(resize_center_crop(np.asarray(source[i]["image"]), resolution, 3))
            for i in range(len(source))
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="shapes")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--channels", default="32,64,64", help="block_out_channels")
    parser.add_argument("--latent-channels", type=int, default=4)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.shapes.size=2000")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[train_vae] %(message)s")

    cfg = config_lib.load_config(None, args.overrides)
    source = load(args.source, args.split, config=cfg.data)
    images = images_of(source, args.resolution)
    log.info("%d images of %s/%s at %d px", len(images), args.source, args.split, args.resolution)
    channels = tuple(int(c) for c in args.channels.split(","))
    raw = diffusers_config(channels, args.latent_channels, args.groups, 1.0)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(raw))
    vae_config = vae_lib.VaeConfig.from_json(args.out / "config.json")
    graphdef, params = nnx.split(
        vae_lib.AutoencoderKL(vae_config, rngs=nnx.Rngs(args.seed)), nnx.Param
    )
    schedule = optax.cosine_decay_schedule(args.learning_rate, args.steps, alpha=0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    opt_state = optimizer.init(params)

    def loss_fn(params, batch, rng):
        model = nnx.merge(graphdef, params)
        mean, std = model.encode(batch)
        z = mean + std * jax.random.normal(rng, mean.shape)
        reconstruction = model.decode(z)
        mse = jnp.mean(jnp.square(reconstruction - batch))
        kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.square(std) - 1 - 2 * jnp.log(std))
        return mse + args.kl_weight * kl, mse

    @jax.jit
    def step(params, opt_state, batch, rng):
        (_, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, mse

    rng = np.random.default_rng(args.seed)
    key = jax.random.key(args.seed)
    started, mses = time.perf_counter(), []
    for number in range(args.steps):
        batch = images[rng.integers(0, len(images), args.batch_size)]
        if rng.random() < 0.5:
            batch = batch[:, :, ::-1]  # horizontal flips
        params, opt_state, mse = step(params, opt_state, batch, jax.random.fold_in(key, number))
        mses.append(mse)
        if (number + 1) % 250 == 0 or number + 1 == args.steps:
            log.info(
                "step %d/%d: reconstruction mse %.5f (%.0f s)",
                number + 1,
                args.steps,
                float(np.mean(jax.device_get(mses[-50:]))),
                time.perf_counter() - started,
            )

    encode = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode(x))
    means = np.concatenate(
        [np.asarray(encode(params, images[i : i + 256])[0]) for i in range(0, len(images), 256)]
    )
    scaling = float(1.0 / means.std())
    save_folder(
        args.out, diffusers_config(channels, args.latent_channels, args.groups, scaling), params
    )
    checkpoint = vae_lib.load_vae(args.out)
    check = np.asarray(vae_lib.encode_fn(checkpoint)(checkpoint.params, images[:8])[0])
    error = float(np.abs(check - means[:8]).max())
    decoded = np.asarray(
        vae_lib.decode_fn(checkpoint, scaled=False)(checkpoint.params, means[:256])
    )
    mse = float(np.mean(np.square(decoded - images[:256])))
    summary = {
        "source": f"{args.source}/{args.split}",
        "images": len(images),
        "resolution": args.resolution,
        "block_out_channels": list(channels),
        "latent_shape": list(means.shape[1:]),
        "steps": args.steps,
        "train_seconds": round(time.perf_counter() - started, 1),
        "reconstruction_mse_of_mean": round(mse, 5),
        "reconstruction_psnr_db": round(10 * np.log10(4.0 / mse), 2),
        "scaling_factor": scaling,
        "reload_max_abs_error": error,
    }
    (args.out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
