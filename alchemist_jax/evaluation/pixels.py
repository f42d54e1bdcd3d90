"""What evaluation needs beyond the DiT on user data and latent datasets: the VAE decoder that
turns latents into pixels, and the CLIP metrics.

  decoder        `Decoder(vae_path)`: stored latents (N, h, w, c) (`alchemist-jax encode`:
                 scaled posterior means) -> images (N, H, W, 3) in [-1, 1], in fixed-size
                 batches
  CLIP judge     `ClipJudge(clip_path)`: projected CLIP image embeddings (for `clip_fd`, the
                 Fréchet distance of real and generated images in CLIP space, an FID analogue)
                 and the cosine similarity of each image with its caption (`clip_score`, in
                 [-1, 1]), from a local HF CLIP folder (`models.clip`)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from alchemist_jax.models import clip as clip_lib
from alchemist_jax.models import vae as vae_lib

BATCH_SIZE = 64  # rows per jitted decoder / CLIP call (the last batch is padded)

# The metrics a latent test set without `evaluate.vae_path` cannot report, and why.
NEEDS_VAE = (
    "the test set holds VAE latents: set evaluate.vae_path=DIR (the VAE that encoded them) to "
    "decode samples to pixels"
)


def _batched(fn, arrays: Sequence[np.ndarray], batch_size: int = BATCH_SIZE) -> np.ndarray:
    """`fn(*batch)` over rows of `arrays` (N, ...) in padded fixed-size batches -> (N, ...)."""
    rows = len(arrays[0])
    out = []
    for start in range(0, rows, batch_size):
        batch = [a[start : start + batch_size] for a in arrays]
        real = len(batch[0])
        if real < batch_size:
            batch = [np.concatenate([b, np.repeat(b[-1:], batch_size - real, 0)]) for b in batch]
        out.append(np.asarray(fn(*batch))[:real])
    return np.concatenate(out)


class Decoder:
    """The VAE of `vae_path` as a latent -> pixel map (see the module docstring).

    Raises ValueError (one line, naming the folder) for a missing or unsupported VAE.
    """

    def __init__(self, vae_path: str):
        self.checkpoint = vae_lib.load_vae(vae_path)
        self._decode = vae_lib.decode_fn(self.checkpoint, scaled=True)

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        """latents (N, h, w, latent_channels) as stored -> float32 (N, h f, w f, 3) in [-1, 1]."""
        channels = self.checkpoint.config.latent_channels
        if latents.ndim != 4 or latents.shape[-1] != channels:
            raise ValueError(
                f"latents {latents.shape} do not fit the VAE {self.checkpoint.directory} "
                f"({channels} latent channels, NHWC)"
            )
        images = _batched(lambda z: self._decode(self.checkpoint.params, z), [latents])
        return np.clip(images, -1.0, 1.0).astype(np.float32)


class ClipJudge:
    """A local HF CLIP folder as image features and caption scores (see the module docstring).

    Raises ValueError (one line, naming the folder) for a missing or unsupported checkpoint.
    """

    def __init__(self, clip_path: str):
        self.checkpoint = checkpoint = clip_lib.load_clip(clip_path)
        graphdef, config = checkpoint.graphdef, checkpoint.config
        mean, std = checkpoint.image_mean, checkpoint.image_std

        def embed(params, images):
            pixels = clip_lib.clip_pixels(images, config.image_size, mean, std)
            return nnx.merge(graphdef, params).image_embeds(pixels)

        self._embed = jax.jit(embed)
        self._score = clip_lib.clip_score_fn(checkpoint)

    def features(self, images: np.ndarray) -> np.ndarray:
        """images (N, H, W, C) in [-1, 1] -> (N, P) projected CLIP image embeddings."""
        return _batched(lambda x: self._embed(self.checkpoint.params, x), [images])

    def scores(self, images: np.ndarray, captions: Sequence[str]) -> np.ndarray:
        """images (N, H, W, C) in [-1, 1], N captions -> (N,) cosine similarities in [-1, 1]."""
        if len(captions) != len(images):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        tokens = self.checkpoint.tokenize(list(captions))
        return _batched(lambda x, t: self._score(self.checkpoint.params, x, t), [images, tokens])
