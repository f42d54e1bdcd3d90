"""Heuristic scorers: pure jitted functions of the preprocessed images, higher = better.

  clarity        variance of the Laplacian (sharpness)
  edge_density   fraction of pixels on a Sobel edge
  low_frequency  -fraction of the spectral energy in the lowest frequencies

`HEURISTICS` maps each name of `config.HEURISTIC_SCORERS` to its image-batch function.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# A pixel is on an edge when its Sobel gradient magnitude exceeds this, in units of the [-1, 1]
# image: a step edge of height h gives 4h beside it, so 2.0 means a step of more than a quarter
# of the full range (64 of 255 grey levels; 255 in the Sobel units of 8-bit images, where Canny's
# usual thresholds lie); a linear ramp of slope s per pixel gives 8s, so a ramp across the full
# range counts only if it is shorter than 8 pixels. (On the demo pool a threshold of 1.0 ranked
# blurred digits above clean ones: blur widens the band of weak gradients.)
EDGE_THRESHOLD = 2.0
# Spatial frequencies within this radius (cycles per pixel; Nyquist = 0.5) are "low": a quarter
# of the Nyquist frequency, i.e. up to resolution/8 cycles per image (3.5 for 28x28).
LOW_FREQUENCY_RADIUS = 0.125

_LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32)
_SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)


def _gray(images: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, H, W): the mean over channels."""
    return jnp.mean(images, axis=-1)


def _filter3x3(gray: jax.Array, kernel: np.ndarray) -> jax.Array:
    """Cross-correlation of (B, H, W) with a 3x3 kernel over the valid region: (B, H-2, W-2)."""
    out = jax.lax.conv_general_dilated(
        gray[:, None], jnp.asarray(kernel)[None, None], window_strides=(1, 1), padding="VALID"
    )
    return out[:, 0]


@jax.jit
def clarity(images: jax.Array) -> jax.Array:
    """Sharpness: the variance over pixels of the 3x3 Laplacian of the channel-mean image.

    images: (B, H, W, C) in [-1, 1] -> (B,) >= 0, higher = sharper (0 for a constant image).
    The Laplacian is taken over the valid (H-2, W-2) region, so borders add no artificial edges.
    """
    return jnp.var(_filter3x3(_gray(images), _LAPLACIAN), axis=(1, 2))


@jax.jit
def edge_density(images: jax.Array) -> jax.Array:
    """Detail: the fraction of (valid-region) pixels whose Sobel gradient magnitude of the
    channel-mean image exceeds `EDGE_THRESHOLD`. images: (B, H, W, C) in [-1, 1] -> (B,) in
    [0, 1], higher = more edges."""
    gray = _gray(images)
    gx, gy = _filter3x3(gray, _SOBEL_X), _filter3x3(gray, _SOBEL_X.T)
    return jnp.mean(jnp.sqrt(gx**2 + gy**2) > EDGE_THRESHOLD, axis=(1, 2))


@jax.jit
def low_frequency_energy(images: jax.Array) -> jax.Array:
    """Smoothness: the fraction of the spectral energy (2-D FFT of the channel-mean image, DC
    excluded) within `LOW_FREQUENCY_RADIUS` cycles per pixel of DC. images: (B, H, W, C) in
    [-1, 1] -> (B,) in [0, 1]; a constant image (no energy off DC) counts as 1."""
    gray = _gray(images)
    gray = gray - jnp.mean(gray, axis=(1, 2), keepdims=True)  # DC removed exactly
    power = jnp.abs(jnp.fft.fft2(gray)) ** 2
    fy, fx = np.meshgrid(
        np.fft.fftfreq(gray.shape[1]), np.fft.fftfreq(gray.shape[2]), indexing="ij"
    )
    low = jnp.asarray(np.hypot(fy, fx) <= LOW_FREQUENCY_RADIUS)
    tiny = 1e-6  # energy of a constant image is ~0: 0/0 -> 1
    return (jnp.sum(power * low, axis=(1, 2)) + tiny) / (jnp.sum(power, axis=(1, 2)) + tiny)


# Heuristic name -> score of an image batch, oriented so that higher = better: sharper, more
# edges, less of the energy in the lowest frequencies (blur, blank and low-res images score low).
HEURISTICS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "clarity": clarity,
    "edge_density": edge_density,
    "low_frequency": jax.jit(lambda images: -low_frequency_energy(images)),
}
