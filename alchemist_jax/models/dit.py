"""A text-conditioned Diffusion Transformer (DiT) that predicts a rectified-flow velocity.

x_t (B, H, W, C) -> patches of p x p -> tokens (B, N, D), N = (H/p)(W/p), plus a fixed 2-D sin-cos
position embedding -> depth blocks -> final layer -> unpatchify -> v_pred (B, H, W, C). The blocks
are one stacked module applied by a scan (`models.stacked`), so compile time does not grow with
depth; `block_remat` checkpoints each of them.

Precision (`dtype`, `config.COMPUTE_DTYPES`): None computes in the parameters' dtype (float32, or
float64 under x64). bfloat16: every layer computes in bfloat16 (its inputs and parameters cast)
and the residual stream is bfloat16, while parameters stay float32 (master weights) and v_pred is
cast back to float32 before any loss; the timestep features are computed before the cast (angles
up to 1000 rad need float32) and softmax and LayerNorm statistics run in float32.

Conditioning: c = MLP(sinusoidal(t)) + Linear(pooled text) (B, D) drives adaLN-Zero modulation
(shift, scale, gate) of every sub-layer; the token features of the caption (B, L, D) are the keys
and values of a cross-attention in every block. All modulation layers and the output layer start at
zero, so at initialisation every block is the identity and the model outputs exactly zero.

The same code runs on pixels and on latents: the input is `batch["latent"]` when the batch carries
one, else `batch["image"]` (`visual_input`). The caption comes from one of two places, fixed at
construction: the model's own CLIP-style `TextEncoder` over `batch["tokens"]`, or precomputed
`batch["text_embedding"]` (B, L, Dt) that bypasses the encoder.

Caption dropout (for classifier-free guidance) replaces a row's caption by a learned null caption:
null token features (L, D) with every position attendable and a null pooled vector (D,).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alchemist_jax.models.sharding import axes, linear
from alchemist_jax.models.stacked import scan_blocks, stack_blocks
from alchemist_jax.models.text_encoder import Attention, Mlp, TextEncoder, masked_mean

_TIME_FREQUENCIES = 256  # size of the sinusoidal timestep features


def visual_input(batch: dict) -> jax.Array:
    """The array the models see: `batch["latent"]` (B, h, w, c) if present, else `batch["image"]`
    (B, H, W, C) in [-1, 1]."""
    return batch["latent"] if "latent" in batch else batch["image"]


def precomputed_caption(batch: dict) -> tuple[jax.Array, jax.Array]:
    """`text_embedding` (B, L, Dt) and its mask: `token_mask` (B, L) if present, else all True."""
    if "text_embedding" not in batch:
        raise ValueError(
            "the model was built for precomputed `text_embedding` captions; the batch has none"
        )
    features = batch["text_embedding"]
    mask = batch.get("token_mask", jnp.ones(features.shape[:2], bool))
    if mask.shape != features.shape[:2]:
        raise ValueError(f"token_mask {mask.shape} does not match text_embedding {features.shape}")
    return features, mask


def caption_features(
    token_embedding: nnx.Param | None, batch: dict, owner: str
) -> tuple[jax.Array, jax.Array]:
    """Caption features (B, L, D) and mask (B, L) of a model with its own token table: rows of
    `token_embedding` (VOCAB, D) looked up by `tokens`, masked by `token_mask`; a model built
    without a table (None) reads the precomputed `text_embedding` instead. `owner` names the model
    in the error for a batch of the other kind."""
    if token_embedding is None:
        return precomputed_caption(batch)
    if "text_embedding" in batch:
        raise ValueError(
            f"the {owner} was built for token captions; the batch carries a "
            "precomputed `text_embedding`"
        )
    return jnp.take(token_embedding[...], batch["tokens"], axis=0), batch["token_mask"]


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal features of flow times t in [0, 1] (scaled by 1000 like DDPM steps).

    t: (B,) float -> (B, dim) [cos | sin], in t's dtype.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=t.dtype) / half)
    angles = (1000 * t)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def sincos_position_embedding(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding (MAE/DiT): (grid_h * grid_w, dim), rows in raster order.

    Half of the features encode the column, half the row; dim must be divisible by 4.
    """
    omega = 1.0 / 10_000 ** (np.arange(dim // 4) / (dim // 4))
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    col_angles = cols.reshape(-1, 1) * omega[None]
    row_angles = rows.reshape(-1, 1) * omega[None]
    return np.concatenate(
        [np.sin(col_angles), np.cos(col_angles), np.sin(row_angles), np.cos(row_angles)], axis=1
    )


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale) + shift


def _plain_norm(width: int, dtype: jnp.dtype | None, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm without its own scale and bias (adaLN supplies them), output in `dtype`."""
    return nnx.LayerNorm(
        width, epsilon=1e-6, use_scale=False, use_bias=False, dtype=dtype, rngs=rngs
    )


def _zero_linear(
    in_features: int,
    out_features: int,
    dtype: jnp.dtype | None,
    rngs: nnx.Rngs,
    names: tuple[str | None, str | None],
) -> nnx.Linear:
    """A Linear that starts at zero, computing in `dtype`; `names`: logical axes of its
    (in, out) kernel."""
    return nnx.Linear(
        in_features,
        out_features,
        kernel_init=nnx.initializers.zeros,
        bias_init=nnx.initializers.zeros,
        dtype=dtype,
        **linear(*names),
        rngs=rngs,
    )


class DiTBlock(nnx.Module):
    """adaLN-Zero block: self-attention, cross-attention to the caption, MLP.

    Each sub-layer is x + gate * f(LN(x) * (1 + scale) + shift), with (shift, scale, gate) from a
    zero-initialised Linear of SiLU(c): the block is exactly the identity at initialisation.
    `dtype`: compute dtype of its layers (module docstring).
    """

    def __init__(
        self, width: int, heads: int, mlp_ratio: float, *, dtype: jnp.dtype | None, rngs: nnx.Rngs
    ):
        self.norm_self = _plain_norm(width, dtype, rngs)
        self.self_attn = Attention(width, heads, dtype=dtype, rngs=rngs)
        self.norm_cross = _plain_norm(width, dtype, rngs)
        self.cross_attn = Attention(width, heads, dtype=dtype, rngs=rngs)
        self.norm_mlp = _plain_norm(width, dtype, rngs)
        self.mlp = Mlp(width, int(width * mlp_ratio), dtype=dtype, rngs=rngs)
        self.modulation = _zero_linear(width, 9 * width, dtype, rngs, ("embed", "mlp"))

    def __call__(
        self, x: jax.Array, c: jax.Array, context: jax.Array, context_mask: jax.Array
    ) -> jax.Array:
        """x: (B, N, D) image tokens; c: (B, D) conditioning; context: (B, L, D) caption features;
        context_mask: bool (B, L), True on attendable caption positions. Returns (B, N, D)."""
        (shift_s, scale_s, gate_s, shift_c, scale_c, gate_c, shift_m, scale_m, gate_m) = jnp.split(
            self.modulation(jax.nn.silu(c))[:, None], 9, axis=-1
        )
        x = x + gate_s * self.self_attn(_modulate(self.norm_self(x), shift_s, scale_s))
        x = x + gate_c * self.cross_attn(
            _modulate(self.norm_cross(x), shift_c, scale_c), context_mask[:, None, None, :], context
        )
        return x + gate_m * self.mlp(_modulate(self.norm_mlp(x), shift_m, scale_m))


class FinalLayer(nnx.Module):
    """adaLN-modulated LayerNorm, then a zero-initialised Linear to p*p*C values per patch."""

    def __init__(self, width: int, out_features: int, *, dtype: jnp.dtype | None, rngs: nnx.Rngs):
        self.norm = _plain_norm(width, dtype, rngs)
        self.modulation = _zero_linear(width, 2 * width, dtype, rngs, ("embed", "mlp"))
        self.linear = _zero_linear(width, out_features, dtype, rngs, ("embed", None))

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        """x: (B, N, D), c: (B, D) -> (B, N, out_features)."""
        shift, scale = jnp.split(self.modulation(jax.nn.silu(c))[:, None], 2, axis=-1)
        return self.linear(_modulate(self.norm(x), shift, scale))


class DiT(nnx.Module):
    """Text-to-image DiT predicting the flow velocity v = eps - x0 (see the module docstring).

    Args:
      channels: C of the input (image or latent) channels.
      patch_size: p; H and W of the input must be divisible by p.
      width: transformer width D (divisible by `heads` and by 4).
      depth: number of DiT blocks (stacked along `layers`, applied by a scan).
      heads: attention heads.
      mlp_ratio: MLP hidden size / D.
      text_length: L, the longest caption (token ids or precomputed embedding rows) accepted; the
        text encoder's position table and the null caption have this length.
      text_width, text_depth, text_heads: the CLIP-style text encoder (tokens input only).
      text_trainable: False freezes the text encoder: its outputs pass through
        `jax.lax.stop_gradient`, so its parameters get exactly zero gradient; `init_proxy`
        also leaves them out of the trainable parameters.
      text_embedding_dim: None: captions are token ids encoded by the model's own `TextEncoder`.
        An int Dt: captions are precomputed `text_embedding` (B, L, Dt) rows; no text encoder is
        built and a Linear projects them to D.
      block_remat: checkpointing of each block, the text encoder's too (`config.BLOCK_REMAT`).
      dtype: compute dtype (module docstring); None: the parameters' dtype. Parameters are
        created in float32 either way.
    """

    def __init__(
        self,
        *,
        channels: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        text_length: int,
        text_width: int,
        text_depth: int,
        text_heads: int,
        text_trainable: bool = True,
        text_embedding_dim: int | None = None,
        block_remat: str = "none",
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        if width % 4:
            raise ValueError(f"width {width} must be divisible by 4 (2-D sin-cos embedding)")
        self.patch_size = patch_size
        self.width = width
        self.text_length = text_length
        self.text_trainable = text_trainable
        self.block_remat = block_remat
        self.dtype = dtype
        if text_embedding_dim is None:
            self.text_encoder = TextEncoder(
                text_width,
                text_depth,
                text_heads,
                text_length,
                block_remat=block_remat,
                dtype=dtype,
                rngs=rngs,
            )
            caption_width = text_width
        else:
            self.text_encoder = None
            caption_width = text_embedding_dim
        self.text_proj = nnx.Linear(
            caption_width, width, dtype=dtype, **linear("mlp", "embed"), rngs=rngs
        )
        self.pooled_proj = nnx.Linear(
            caption_width, width, dtype=dtype, **linear("mlp", "embed"), rngs=rngs
        )
        self.null_tokens = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (text_length, width)),
            **axes(None, "embed"),
        )
        self.null_pooled = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (width,)), **axes("embed")
        )
        self.patch_embed = nnx.Linear(
            patch_size * patch_size * channels,
            width,
            dtype=dtype,
            **linear(None, "embed"),
            rngs=rngs,
        )
        self.time_mlp = nnx.Sequential(
            nnx.Linear(
                _TIME_FREQUENCIES,
                width,
                kernel_init=nnx.initializers.normal(0.02),
                dtype=dtype,
                **linear(None, "mlp"),
                rngs=rngs,
            ),
            jax.nn.silu,
            nnx.Linear(
                width,
                width,
                kernel_init=nnx.initializers.normal(0.02),
                dtype=dtype,
                **linear("mlp", "embed"),
                rngs=rngs,
            ),
        )
        self.blocks = stack_blocks(
            lambda rngs: DiTBlock(width, heads, mlp_ratio, dtype=dtype, rngs=rngs), depth, rngs
        )
        self.final = FinalLayer(width, patch_size * patch_size * channels, dtype=dtype, rngs=rngs)

    def encode_caption(
        self, batch: dict, drop_text: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The caption as cross-attention context and pooled vector, in model width D.

        Args:
          batch: with `tokens` int32 (B, L) and `token_mask` bool (B, L), or, for a model built
            with `text_embedding_dim`, `text_embedding` (B, L, Dt) and optionally `token_mask`
            (B, L) (absent: every row is used). Precomputed: pooled = masked mean over L.
          drop_text: bool (B,); True rows get the null caption (independent of the batch).
        Returns:
          context (B, L, D), context_mask bool (B, L), pooled (B, D).
        """
        if self.text_encoder is None:
            features, mask = precomputed_caption(batch)
            pooled = masked_mean(features, mask)
        else:
            if "text_embedding" in batch:
                raise ValueError(
                    "the model was built for token captions (its own text encoder); "
                    "the batch carries a precomputed `text_embedding`"
                )
            mask = batch["token_mask"]
            features, pooled = self.text_encoder(batch["tokens"], mask)
            if not self.text_trainable:
                features, pooled = jax.lax.stop_gradient((features, pooled))
        length = features.shape[1]
        if length > self.text_length:
            raise ValueError(
                f"caption length {length} exceeds the model's text_length {self.text_length}"
            )
        # The null caption in the projections' (compute) dtype.
        features = self.text_proj(features)
        context = jnp.where(
            drop_text[:, None, None], self.null_tokens[:length].astype(features.dtype), features
        )
        context_mask = mask | drop_text[:, None]
        pooled = self.pooled_proj(pooled)
        pooled = jnp.where(drop_text[:, None], self.null_pooled[...].astype(pooled.dtype), pooled)
        return context, context_mask, pooled

    def __call__(
        self, x_t: jax.Array, t: jax.Array, batch: dict, drop_text: jax.Array | None = None
    ) -> jax.Array:
        """Predicts the velocity.

        Args:
          x_t: (B, H, W, C) noisy input at flow time t.
          t: (B,) flow times in [0, 1] (0 = data, 1 = noise).
          batch: the caption fields (see `encode_caption`).
          drop_text: bool (B,), True rows are conditioned on the null caption; None: no row.
        Returns:
          v_pred: (B, H, W, C); float32 when the model computes in bfloat16.
        """
        b, h, w, c = x_t.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"input {h}x{w} is not divisible by patch_size {p}")
        gh, gw = h // p, w // p
        if drop_text is None:
            drop_text = jnp.zeros((b,), bool)
        context, context_mask, pooled = self.encode_caption(batch, drop_text)

        patches = x_t.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = self.patch_embed(patches.reshape(b, gh * gw, p * p * c))
        x = x + jnp.asarray(sincos_position_embedding(gh, gw, self.width), x.dtype)
        cond = (
            self.time_mlp(timestep_embedding(jnp.asarray(t, x_t.dtype), _TIME_FREQUENCIES)) + pooled
        )
        x = scan_blocks(self.blocks, x, cond, context, context_mask, remat=self.block_remat)
        out = self.final(x, cond).reshape(b, gh, gw, p, p, c).transpose(0, 1, 3, 2, 4, 5)
        out = out.reshape(b, h, w, c)
        return out if self.dtype is None else out.astype(jnp.float32)
