"""A diffusers `AutoencoderKL` (encoder and decoder) in Flax NNX, loaded from a local folder.

`load_vae(directory)` reads a folder written by `diffusers.AutoencoderKL.save_pretrained`
(`config.json` + `diffusion_pytorch_model.safetensors`, or the shards that
`diffusion_pytorch_model.safetensors.index.json` lists; float32, float16 or bfloat16 weights,
computed in float32 by default) and returns the model split into `graphdef` + `params`. Nothing is
downloaded and torch is not needed (the reader and the key/layout rules are `clip.py`'s).

Supported: `_class_name` "AutoencoderKL" with only "DownEncoderBlock2D" / "UpDecoderBlock2D"
blocks and the "silu" activation, which covers
  SD 1.x / 2.x / SDXL   4 latent channels, quant_conv and post_quant_conv, scaling_factor
  FLUX / SD3            16 latent channels, `use_quant_conv` / `use_post_quant_conv` false,
                        scaling_factor and shift_factor
Other classes (AutoencoderKLWan, AutoencoderDC, ...), block types, activations or per-channel
`latents_mean` / `latents_std` are refused with a one-line error naming the folder and the value.

The modules carry diffusers' parameter names (`encoder.down_blocks.0.resnets.1.conv1.weight`);
old exports' attention names (`query`, `key`, `value`, `proj_attn`) are read as the new ones.
Images and latents are NHWC: `encode_fn` maps images (B, H, W, 3) in [-1, 1] to the posterior's
mean and std (B, H/f, W/f, latent_channels), f = 2^(len(block_out_channels) - 1) (8 for the real
checkpoints); `decode_fn` maps latents back. What a dataset stores is the scaled latent
`(mean - shift_factor) * scaling_factor` (`scale_latents`; `unscale_latents` inverts it).

Size: the diffusers AutoencoderKL's encoder, decoder and mid-block, their parameter names and
the loader's refusals in one place, mirroring one upstream class.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alchemist_jax.models.clip import params_from_tensors, read_safetensors

CLASS_NAME = "AutoencoderKL"
DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
ACTIVATIONS = ("silu", "swish")  # the same function in diffusers' get_activation
WEIGHTS_STEM = "diffusion_pytorch_model"
# diffusers' ResnetBlock2D / Attention epsilon inside Encoder and Decoder (not in config.json).
NORM_EPS = 1e-6
# The posterior's log-variance clamp of diffusers' DiagonalGaussianDistribution.
LOGVAR_RANGE = (-30.0, 20.0)
# Attention parameter names of exports from before diffusers 0.14 -> today's names.
DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


# ==============================================================================================
# Configuration
# ==============================================================================================


@dataclasses.dataclass(frozen=True)
class VaeConfig:
    """The architecture and latent scaling of a diffusers `AutoencoderKL` (its config.json)."""

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    norm_num_groups: int
    use_quant_conv: bool
    use_post_quant_conv: bool
    mid_block_add_attention: bool
    scaling_factor: float
    shift_factor: float  # 0.0 where config.json has none (null)

    @property
    def downsampling(self) -> int:
        """f: images of H x W pixels have latents of H/f x W/f."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_json(cls, path: Path) -> VaeConfig:
        """Reads a diffusers AutoencoderKL `config.json` (missing keys take diffusers'
        defaults). Raises ValueError naming the file, the key and the value of anything
        unsupported."""
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {path}: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path} is not a JSON object")
        name = raw.get("_class_name")
        if name != CLASS_NAME:
            raise ValueError(
                f"{path.parent}: _class_name {name!r} is not supported (only "
                f"{CLASS_NAME!r}: SD/SDXL/FLUX/SD3-style VAEs)"
            )
        get = raw.get
        channels = tuple(get("block_out_channels", (64,)))
        down = list(get("down_block_types", (DOWN_BLOCK,)))
        up = list(get("up_block_types", (UP_BLOCK,)))
        for key, types, wanted in (
            ("down_block_types", down, DOWN_BLOCK),
            ("up_block_types", up, UP_BLOCK),
        ):
            other = [t for t in types if t != wanted]
            if other:
                raise ValueError(
                    f"{path.parent}: {key} has {other[0]!r}, which is not "
                    f"supported (only {wanted!r})"
                )
            if len(types) != len(channels):
                raise ValueError(
                    f"{path.parent}: {key} has {len(types)} blocks but "
                    f"block_out_channels has {len(channels)}"
                )
        act = get("act_fn", "silu")
        if act not in ACTIVATIONS:
            raise ValueError(
                f"{path.parent}: act_fn {act!r} is not supported (only {', '.join(ACTIVATIONS)})"
            )
        for key in ("latents_mean", "latents_std"):
            if get(key) is not None:
                raise ValueError(
                    f"{path.parent}: {key} {get(key)!r} (per-channel latent "
                    "normalisation) is not supported, only scaling_factor and "
                    "shift_factor"
                )
        groups = int(get("norm_num_groups", 32))
        if not channels or any(c % groups for c in channels):
            raise ValueError(
                f"{path.parent}: block_out_channels {list(channels)} are not all "
                f"divisible by norm_num_groups {groups}"
            )
        shift = get("shift_factor")
        return cls(
            in_channels=int(get("in_channels", 3)),
            out_channels=int(get("out_channels", 3)),
            block_out_channels=tuple(int(c) for c in channels),
            layers_per_block=int(get("layers_per_block", 1)),
            latent_channels=int(get("latent_channels", 4)),
            norm_num_groups=groups,
            use_quant_conv=bool(get("use_quant_conv", True)),
            use_post_quant_conv=bool(get("use_post_quant_conv", True)),
            mid_block_add_attention=bool(get("mid_block_add_attention", True)),
            scaling_factor=float(get("scaling_factor", 0.18215)),
            shift_factor=0.0 if shift is None else float(shift),
        )


# ==============================================================================================
# Modules (attribute names are diffusers' parameter names; activations NHWC)
# ==============================================================================================


def _group_norm(channels: int, groups: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
    # Two-pass variance, as torch computes it.
    return nnx.GroupNorm(channels, groups, epsilon=NORM_EPS, use_fast_variance=False, rngs=rngs)


def _conv3(c_in: int, c_out: int, rngs: nnx.Rngs, stride: int = 1, padding: Any = 1) -> nnx.Conv:
    """torch Conv2d(c_in, c_out, 3, stride, padding); `padding` an int or ((top, bottom),
    (left, right))."""
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nnx.Conv(c_in, c_out, (3, 3), strides=(stride, stride), padding=padding, rngs=rngs)


def _conv1(c_in: int, c_out: int, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(c_in, c_out, (1, 1), padding="VALID", rngs=rngs)


class ResnetBlock2D(nnx.Module):
    """diffusers `ResnetBlock2D` without time embedding: x + conv2(silu(norm2(conv1(silu(
    norm1(x)))))), the skip through a 1x1 `conv_shortcut` when the width changes."""

    def __init__(self, c_in: int, c_out: int, groups: int, *, rngs: nnx.Rngs):
        self.norm1 = _group_norm(c_in, groups, rngs)
        self.conv1 = _conv3(c_in, c_out, rngs)
        self.norm2 = _group_norm(c_out, groups, rngs)
        self.conv2 = _conv3(c_out, c_out, rngs)
        self.conv_shortcut = _conv1(c_in, c_out, rngs) if c_in != c_out else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, c_in) -> (B, H, W, c_out)."""
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nnx.Module):
    """diffusers `Attention` of the VAE mid-block: one head over the H*W positions, GroupNorm
    first, residual added."""

    def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs):
        self.group_norm = _group_norm(channels, groups, rngs)
        self.to_q = nnx.Linear(channels, channels, rngs=rngs)
        self.to_k = nnx.Linear(channels, channels, rngs=rngs)
        self.to_v = nnx.Linear(channels, channels, rngs=rngs)
        self.to_out = nnx.List([nnx.Linear(channels, channels, rngs=rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        batch, height, width, channels = x.shape
        h = self.group_norm(x).reshape(batch, height * width, channels)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        logits = jnp.einsum("bqc,bkc->bqk", q, k) * channels**-0.5
        out = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits, axis=-1), v)
        return x + self.to_out[0](out).reshape(x.shape)


class UNetMidBlock2D(nnx.Module):
    """diffusers `UNetMidBlock2D` as the VAE uses it: resnet, attention (unless
    mid_block_add_attention is false), resnet."""

    def __init__(self, channels: int, groups: int, attention: bool, *, rngs: nnx.Rngs):
        self.resnets = nnx.List(
            [ResnetBlock2D(channels, channels, groups, rngs=rngs) for _ in range(2)]
        )
        self.attentions = nnx.List([Attention(channels, groups, rngs=rngs)] if attention else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Downsample2D(nnx.Module):
    """diffusers `Downsample2D(padding=0)`: pad one row / column at the bottom / right, then a
    3x3 convolution of stride 2 (H, W -> H/2, W/2)."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = _conv3(channels, channels, rngs, stride=2, padding=((0, 1), (0, 1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample2D(nnx.Module):
    """diffusers `Upsample2D`: nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = _conv3(channels, channels, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class DownEncoderBlock2D(nnx.Module):
    """`layers` resnets, then a Downsample2D unless it is the last block."""

    def __init__(
        self, c_in: int, c_out: int, layers: int, groups: int, downsample: bool, *, rngs: nnx.Rngs
    ):
        self.resnets = nnx.List(
            [
                ResnetBlock2D(c_in if n == 0 else c_out, c_out, groups, rngs=rngs)
                for n in range(layers)
            ]
        )
        self.downsamplers = nnx.List([Downsample2D(c_out, rngs=rngs)] if downsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for module in [*self.resnets, *self.downsamplers]:
            x = module(x)
        return x


class UpDecoderBlock2D(nnx.Module):
    """`layers` resnets, then an Upsample2D unless it is the last block."""

    def __init__(
        self, c_in: int, c_out: int, layers: int, groups: int, upsample: bool, *, rngs: nnx.Rngs
    ):
        self.resnets = nnx.List(
            [
                ResnetBlock2D(c_in if n == 0 else c_out, c_out, groups, rngs=rngs)
                for n in range(layers)
            ]
        )
        self.upsamplers = nnx.List([Upsample2D(c_out, rngs=rngs)] if upsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for module in [*self.resnets, *self.upsamplers]:
            x = module(x)
        return x


class Encoder(nnx.Module):
    """diffusers `Encoder(double_z=True)`: images (B, H, W, in_channels) -> (B, H/f, W/f,
    2 * latent_channels), the posterior's mean and log-variance concatenated."""

    def __init__(self, config: VaeConfig, *, rngs: nnx.Rngs):
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = _conv3(config.in_channels, channels[0], rngs)
        self.down_blocks = nnx.List(
            [
                DownEncoderBlock2D(
                    channels[max(n - 1, 0)],
                    c,
                    config.layers_per_block,
                    groups,
                    downsample=n < len(channels) - 1,
                    rngs=rngs,
                )
                for n, c in enumerate(channels)
            ]
        )
        self.mid_block = UNetMidBlock2D(
            channels[-1], groups, config.mid_block_add_attention, rngs=rngs
        )
        self.conv_norm_out = _group_norm(channels[-1], groups, rngs)
        self.conv_out = _conv3(channels[-1], 2 * config.latent_channels, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """diffusers `Decoder`: latents (B, h, w, latent_channels) -> images (B, h*f, w*f,
    out_channels); its up blocks run the widths in reverse, with layers_per_block + 1 resnets."""

    def __init__(self, config: VaeConfig, *, rngs: nnx.Rngs):
        channels, groups = config.block_out_channels[::-1], config.norm_num_groups
        self.conv_in = _conv3(config.latent_channels, channels[0], rngs)
        self.mid_block = UNetMidBlock2D(
            channels[0], groups, config.mid_block_add_attention, rngs=rngs
        )
        self.up_blocks = nnx.List(
            [
                UpDecoderBlock2D(
                    channels[max(n - 1, 0)],
                    c,
                    config.layers_per_block + 1,
                    groups,
                    upsample=n < len(channels) - 1,
                    rngs=rngs,
                )
                for n, c in enumerate(channels)
            ]
        )
        self.conv_norm_out = _group_norm(channels[-1], groups, rngs)
        self.conv_out = _conv3(channels[-1], config.out_channels, rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """diffusers `AutoencoderKL`: encoder (+ quant_conv), decoder (after post_quant_conv)."""

    def __init__(self, config: VaeConfig, *, rngs: nnx.Rngs):
        latent = config.latent_channels
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)
        self.quant_conv = _conv1(2 * latent, 2 * latent, rngs) if config.use_quant_conv else None
        self.post_quant_conv = _conv1(latent, latent, rngs) if config.use_post_quant_conv else None

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images (B, H, W, in_channels) -> the posterior's (mean, std), each (B, H/f, W/f,
        latent_channels); the log-variance clamped to [-30, 20] as diffusers does."""
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.exp(0.5 * jnp.clip(logvar, *LOGVAR_RANGE))

    def decode(self, z: jax.Array) -> jax.Array:
        """z (B, h, w, latent_channels), unscaled -> images (B, h*f, w*f, out_channels), about
        [-1, 1] (not clipped)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


# ==============================================================================================
# Loading a diffusers folder
# ==============================================================================================


def _diffusers_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Old exports' attention keys under today's names, their 1x1-convolution weights (C, C, 1,
    1) as linear ones (C, C)."""
    renamed = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if len(parts) >= 2 and "attentions" in parts and parts[-2] in DEPRECATED_ATTENTION:
            key = ".".join([*parts[:-2], DEPRECATED_ATTENTION[parts[-2]], parts[-1]])
        if (
            re.search(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$", key)
            and value.ndim == 4
            and value.shape[2:] == (1, 1)
        ):
            value = value[:, :, 0, 0]
        renamed[key] = value
    return renamed


@dataclasses.dataclass(frozen=True)
class VaeCheckpoint:
    """A loaded AutoencoderKL folder: the model split into graphdef + params, and its config
    (architecture, scaling_factor, shift_factor)."""

    directory: Path
    config: VaeConfig
    graphdef: nnx.GraphDef
    params: nnx.State

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        return self.config.shift_factor


def load_vae(directory: str | Path, dtype: Any = np.float32) -> VaeCheckpoint:
    """Loads a diffusers AutoencoderKL folder (see the module docstring), parameters cast to
    `dtype` whatever the files hold.

    Raises:
      ValueError with a one-line message naming the folder, file or key at fault: not a folder,
      no config.json, an unsupported class, block type or setting, no weights, or a missing,
      unexpected or misshapen parameter.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"VAE directory {directory} does not exist")
    if not (directory / "config.json").is_file():
        raise ValueError(
            f"{directory} has no config.json (a diffusers AutoencoderKL folder is needed)"
        )
    config = VaeConfig.from_json(directory / "config.json")
    tensors = _diffusers_names(read_safetensors(directory, WEIGHTS_STEM))
    graphdef, params = params_from_tensors(
        lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)),
        tensors,
        where=directory,
        described="the AutoencoderKL",
        dtype=dtype,
    )
    return VaeCheckpoint(directory, config, graphdef, params)


# ==============================================================================================
# Pure functions
# ==============================================================================================


def _check_size(shape: tuple[int, ...], factor: int, channels: int, what: str) -> None:
    if len(shape) != 4 or shape[-1] != channels:
        raise ValueError(f"{what} must be (B, H, W, {channels}), got {shape}")
    if shape[1] % factor or shape[2] % factor:
        raise ValueError(
            f"{what} of {shape[1]}x{shape[2]} are not divisible by the VAE's "
            f"downsampling factor {factor}"
        )


def encode_fn(checkpoint: VaeCheckpoint) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """The jitted `encode(params, images) -> (mean, std)` of a loaded checkpoint.

    images: (B, H, W, in_channels) float in [-1, 1], H and W divisible by f = 2^(blocks - 1).
    mean, std: (B, H/f, W/f, latent_channels), the unscaled posterior (diffusers'
    `encode(x).latent_dist.mean` / `.std`, in NHWC); `scale_latents(mean, ...)` is what a dataset
    stores.
    """
    graphdef, config = checkpoint.graphdef, checkpoint.config

    def encode(params, images):
        _check_size(images.shape, config.downsampling, config.in_channels, "images")
        return nnx.merge(graphdef, params).encode(images)

    return jax.jit(encode)


def decode_fn(checkpoint: VaeCheckpoint, scaled: bool = True) -> Callable[..., jax.Array]:
    """The jitted `decode(params, latents) -> images` of a loaded checkpoint.

    latents: (B, h, w, latent_channels); with `scaled` (the default) the stored latents
    `(z - shift_factor) * scaling_factor`, unscaled first (`unscale_latents`); else z itself
    (diffusers' `decode(z)`).
    images: (B, h*f, w*f, out_channels) float, about [-1, 1], not clipped.
    """
    graphdef, config = checkpoint.graphdef, checkpoint.config

    def decode(params, latents):
        _check_size(latents.shape, 1, config.latent_channels, "latents")
        z = unscale_latents(latents, config) if scaled else latents
        return nnx.merge(graphdef, params).decode(z)

    return jax.jit(decode)


def scale_latents(z: Any, config: VaeConfig) -> Any:
    """Unscaled latents (the posterior mean, or a sample) -> the stored, roughly unit-variance
    latents `(z - shift_factor) * scaling_factor`; the posterior std scales to
    `std * scaling_factor`. Works on numpy and jax arrays of any shape."""
    return (z - config.shift_factor) * config.scaling_factor


def unscale_latents(latents: Any, config: VaeConfig) -> Any:
    """The inverse of `scale_latents`: `latents / scaling_factor + shift_factor`."""
    return latents / config.scaling_factor + config.shift_factor
