"""A CLIP-style text encoder in Flax NNX, and the attention layer the models share.

The encoder reads CLIP token ids (vocabulary 49,408; `<|endoftext|>` = 49407 ends the caption and
pads it) and returns per-token features for cross-attention plus one pooled vector per caption:
CLIP's pooled output, the features at the end-of-text position.

Attention is written out here (no fused kernels) so that it works under `jax.grad` of `jax.grad`,
`jax.vmap` and float64: every computation follows the dtype of its inputs and parameters, but the
softmax, which runs in at least float32.

`dtype` of the layers (here and in the DiT and rater): None computes in the parameters' dtype
(float32, or float64 under x64); `jnp.bfloat16` casts each layer's inputs and parameters to
bfloat16 for its computation while the parameters stay float32 (`config.COMPUTE_DTYPES`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from alchemist_jax.data.tokenizer import VOCAB_SIZE
from alchemist_jax.models.sharding import axes, linear
from alchemist_jax.models.stacked import scan_blocks, stack_blocks


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None
) -> jax.Array:
    """Softmax attention per head.

    Args:
      q: (B, Lq, H, Dh) queries.
      k, v: (B, Lk, H, Dh) keys and values.
      mask: bool, broadcastable to (B, H, Lq, Lk); True where a query may attend to a key.
        None: attend everywhere. A query with no allowed key attends uniformly (no NaN).
    Returns:
      (B, Lq, H, Dh).
    """
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    # The softmax in float32 at least: in bfloat16 its normaliser would round to 2^-8.
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    if mask is not None:
        # `where` (not an additive bias) so masked keys get exactly zero weight and zero gradient.
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class Attention(nnx.Module):
    """Multi-head attention: self-attention when `context` is None, else cross-attention.

    Args:
      width: feature size D of queries, context and output; must be divisible by `heads`.
      heads: number of heads H.
      dtype: compute dtype of the projections (module docstring); None: the parameters'.
    """

    def __init__(self, width: int, heads: int, *, dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.query = nnx.Linear(width, width, dtype=dtype, **linear("embed", "heads"), rngs=rngs)
        self.key = nnx.Linear(width, width, dtype=dtype, **linear("embed", "heads"), rngs=rngs)
        self.value = nnx.Linear(width, width, dtype=dtype, **linear("embed", "heads"), rngs=rngs)
        self.out = nnx.Linear(width, width, dtype=dtype, **linear("heads", "embed"), rngs=rngs)

    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, context: jax.Array | None = None
    ) -> jax.Array:
        """x: (B, Lq, D); context: (B, Lk, D) or None (then x); mask: bool broadcastable to
        (B, H, Lq, Lk). Returns (B, Lq, D)."""
        context = x if context is None else context

        def split_heads(y):
            return y.reshape(*y.shape[:-1], self.heads, y.shape[-1] // self.heads)

        out = dot_product_attention(
            split_heads(self.query(x)),
            split_heads(self.key(context)),
            split_heads(self.value(context)),
            mask,
        )
        return self.out(out.reshape(*x.shape[:-1], -1))


class Mlp(nnx.Module):
    """Linear -> GELU (tanh) -> Linear, (..., width) -> (..., width); `dtype` as `Attention`'s."""

    def __init__(self, width: int, hidden: int, *, dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(width, hidden, dtype=dtype, **linear("embed", "mlp"), rngs=rngs)
        self.fc2 = nnx.Linear(hidden, width, dtype=dtype, **linear("mlp", "embed"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


def _norm(width: int, dtype: jnp.dtype | None, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """CLIP's LayerNorm (eps 1e-5), scale and bias (D,) along `embed`; output in `dtype`
    (statistics in float32 at least)."""
    return nnx.LayerNorm(
        width,
        epsilon=1e-5,
        dtype=dtype,
        scale_metadata=axes("embed"),
        bias_metadata=axes("embed"),
        rngs=rngs,
    )


class TextBlock(nnx.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, *, dtype: jnp.dtype | None, rngs: nnx.Rngs):
        self.norm1 = _norm(width, dtype, rngs)
        self.attn = Attention(width, heads, dtype=dtype, rngs=rngs)
        self.norm2 = _norm(width, dtype, rngs)
        self.mlp = Mlp(width, 4 * width, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """x: (B, L, D), mask: bool (B, L) -> (B, D), the mean over True positions (0 if none)."""
    weights = mask[..., None].astype(x.dtype)
    return (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1)


def end_of_text_index(mask: jax.Array) -> jax.Array:
    """(B, L) bool token mask -> (B,) int32 index of its last True (CLIP's first end token)."""
    positions = jnp.arange(mask.shape[-1], dtype=jnp.int32)
    return jnp.max(jnp.where(mask, positions, 0), axis=-1)


class TextEncoder(nnx.Module):
    """CLIP-style text transformer: token + learned position embedding, pre-LN blocks with causal
    self-attention (padding keys masked out), final LayerNorm.

    Args:
      width: feature size D.
      depth: number of transformer blocks, stacked along `layers` and applied by a scan
        (`models.stacked`).
      heads: attention heads per block.
      max_length: the longest token sequence L it accepts (size of the position table).
      vocab_size: token vocabulary (CLIP: 49,408).
      block_remat: checkpointing of each block (`config.BLOCK_REMAT`).
      dtype: compute dtype of the layers and the residual stream (module docstring); None: the
        parameters'.
    """

    def __init__(
        self,
        width: int,
        depth: int,
        heads: int,
        max_length: int,
        *,
        rngs: nnx.Rngs,
        vocab_size: int = VOCAB_SIZE,
        block_remat: str = "none",
        dtype: jnp.dtype | None = None,
    ):
        self.max_length = max_length
        self.block_remat = block_remat
        self.dtype = dtype
        self.token_embedding = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (vocab_size, width)),
            **axes("vocab", "embed"),
        )
        self.position_embedding = nnx.Param(
            nnx.initializers.normal(0.01)(rngs.params(), (max_length, width)),
            **axes(None, "embed"),
        )
        self.blocks = stack_blocks(
            lambda rngs: TextBlock(width, heads, dtype=dtype, rngs=rngs), depth, rngs
        )
        self.final_norm = _norm(width, dtype, rngs)

    def __call__(self, tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Encodes token ids.

        Args:
          tokens: int32 (B, L) CLIP ids, L <= max_length.
          mask: bool (B, L), True on real tokens (start, text and the first end token).
        Returns:
          token_features: (B, L, D); features at padding positions are not meaningful (callers
            mask them out).
          pooled: (B, D), the features at the end-of-text position (last True of `mask`).
        """
        length = tokens.shape[-1]
        if length > self.max_length:
            raise ValueError(
                f"token length {length} exceeds the encoder's max_length {self.max_length}"
            )
        # A plain gather (nnx.Embed would cast the table to its construction dtype).
        x = jnp.take(self.token_embedding[...], tokens, axis=0) + self.position_embedding[:length]
        x = x if self.dtype is None else x.astype(self.dtype)
        causal = jnp.tril(jnp.ones((length, length), bool))
        attend = causal[None, None] & mask[:, None, None, :]  # (B, 1, L, L)
        x = scan_blocks(self.blocks, x, attend, remat=self.block_remat)
        x = self.final_norm(x)
        pooled = jnp.take_along_axis(x, end_of_text_index(mask)[:, None, None], axis=1)[:, 0]
        return x, pooled
