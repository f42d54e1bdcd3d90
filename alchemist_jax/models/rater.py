"""The rater: a per-sample weight for the proxy's training loss, learned by meta-gradients.

Image features f (B, Dr): two 3x3 stride-2 convolutions (Dr/4 and Dr/2 channels: cheap, since the
rater runs in every inner step), mean pool over space, Linear; any H, W, C
(the input is `latent` when present, else `image`). Caption embedding e (B, Dr): masked mean of the
rater's own token embedding table (CLIP vocabulary), then Linear; or, for a rater built for
precomputed captions, Linear of the masked mean of `text_embedding`. Joint features
h = [f, e, f * e] (B, 3 Dr) feed:
  - the instance head: MLP (no output bias) -> instance logit u (B,), unbounded. `scores` returns
    u; it is computed
    row by row (no batch statistics), so a sample's score does not depend on its batch.
  - the optional batch head (the paper's "group MLP"): MLP on [mean_B(h), var_B(h)] -> scalar z,
    b = 2 * sigmoid(z) in (0, 2), with the last layer zero-initialised so b = 1 at initialisation.
Training weights: w = B * softmax(u / temperature) * b, so w > 0 and sum(w) = B * b (B without the
batch head): the weighted mean loss keeps the scale of the plain mean loss.

Precision (`dtype`, `config.COMPUTE_DTYPES`): None computes in the parameters' dtype; bfloat16
runs the convolutions and Linears in bfloat16 with float32 parameters, and casts u and z to
float32 before the softmax and the sigmoid (the batch statistics are taken in float32 too).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from alchemist_jax.data.tokenizer import VOCAB_SIZE
from alchemist_jax.models.dit import caption_features, visual_input
from alchemist_jax.models.sharding import axes, linear
from alchemist_jax.models.text_encoder import masked_mean


def _conv_axes(outputs: str) -> dict:
    """Logical axes of a 3x3 conv: kernel (3, 3, Cin, Cout) split along Cout only."""
    return {"kernel_metadata": axes(None, None, None, outputs), "bias_metadata": axes(outputs)}


class Rater(nnx.Module):
    """Per-sample rater (see the module docstring).

    Args:
      channels: C of the rated input (image or latent).
      width: Dr, the size of f and e.
      hidden: hidden width of the heads.
      text_embedding_dim: None: captions are token ids (own embedding table over the CLIP
        vocabulary). An int Dt: captions are precomputed `text_embedding` (B, L, Dt).
      batch_head: build the batch head (b); without it b = 1.
      vocab_size: token vocabulary (CLIP: 49,408).
      dtype: compute dtype (module docstring); None: the parameters' dtype.
    """

    def __init__(
        self,
        *,
        channels: int,
        width: int,
        hidden: int,
        text_embedding_dim: int | None = None,
        batch_head: bool = False,
        rngs: nnx.Rngs,
        vocab_size: int = VOCAB_SIZE,
        dtype: jnp.dtype | None = None,
    ):
        self.dtype = dtype
        conv = dict(kernel_size=(3, 3), strides=2, dtype=dtype, **_conv_axes("mlp"), rngs=rngs)
        self.conv1 = nnx.Conv(channels, width // 4, **conv)
        self.conv2 = nnx.Conv(width // 4, width // 2, **conv)
        self.image_proj = nnx.Linear(
            width // 2, width, dtype=dtype, **linear("mlp", "embed"), rngs=rngs
        )
        if text_embedding_dim is None:
            self.token_embedding = nnx.Param(
                nnx.initializers.normal(1.0)(rngs.params(), (vocab_size, width)),
                **axes("vocab", "embed"),
            )
            caption_width = width
        else:
            self.token_embedding = None
            caption_width = text_embedding_dim
        self.text_proj = nnx.Linear(
            caption_width, width, dtype=dtype, **linear("mlp", "embed"), rngs=rngs
        )
        # No bias on the last layer: the weights are softmax(u / temperature), which does not
        # change when every u moves by one constant, so that bias would get a zero meta-gradient
        # in every mode (only float round-off, which Adam would turn into drift) and would only
        # shift every stored score by the same amount. Rankings do not see it either.
        self.instance_head = nnx.Sequential(
            nnx.Linear(3 * width, hidden, dtype=dtype, **linear("embed", "mlp"), rngs=rngs),
            jax.nn.silu,
            nnx.Linear(hidden, 1, use_bias=False, dtype=dtype, **linear("mlp", None), rngs=rngs),
        )
        if batch_head:
            self.batch_head = nnx.Sequential(
                nnx.Linear(6 * width, hidden, dtype=dtype, **linear("embed", "mlp"), rngs=rngs),
                jax.nn.silu,
                nnx.Linear(
                    hidden,
                    1,
                    kernel_init=nnx.initializers.zeros,
                    dtype=dtype,
                    **linear("mlp", None),
                    rngs=rngs,
                ),
            )
        else:
            self.batch_head = None

    def features(self, batch: dict) -> jax.Array:
        """h = [f, e, f * e]: (B, 3 Dr), each row computed from that row of the batch only."""
        x = visual_input(batch)
        x = jax.nn.silu(self.conv1(x))
        x = jax.nn.silu(self.conv2(x))
        f = self.image_proj(x.mean(axis=(1, 2)))
        captions, mask = caption_features(self.token_embedding, batch, "rater")
        e = self.text_proj(masked_mean(captions, mask))
        return jnp.concatenate([f, e, f * e], axis=-1)

    def _output(self, x: jax.Array) -> jax.Array:
        """x in float32 when the rater computes in bfloat16, else unchanged."""
        return x if self.dtype is None else x.astype(jnp.float32)

    def scores(self, batch: dict) -> jax.Array:
        """Instance logits u: (B,), unbounded; independent of the other rows of the batch."""
        return self._output(self.instance_head(self.features(batch))[:, 0])

    def weights(self, batch: dict, temperature: float) -> jax.Array:
        """Training weights w = B * softmax(u / temperature) * b: (B,), positive, sum B * b."""
        h = self.features(batch)
        u = self._output(self.instance_head(h)[:, 0])
        w = u.shape[0] * jax.nn.softmax(u / temperature)
        if self.batch_head is None:
            return w
        h = self._output(h)
        stats = jnp.concatenate([h.mean(axis=0), h.var(axis=0)])
        return w * 2 * jax.nn.sigmoid(self._output(self.batch_head(stats)[0]))
