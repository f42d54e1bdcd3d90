"""Per-image fingerprints of dedup (pure, jitted) and the batched pass over a pool.

canonicalize          the grayscale image, background level subtracted, re-centred on its
                      centre of mass (a shift of the content moves nothing)
phash_bits/pack_bits  the 64-bit DCT perceptual hash, packed to uint64; `hamming`
pixel_embeddings      the default embedding: the canonical image blurred, downsampled, unit
                      norm; `rater_image_features` the learned one (a rating run's rater)
alignment_images      what the final check compares, and `aligned_cosine`, the check
fingerprints          hashes and embeddings of a whole pool in fixed-shape batches
passes                the progress reporter of dedup's long passes, which stops at the next
                      batch on SIGTERM / SIGINT (`preemption.Preempted`)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alchemist_jax import config as config_lib
from alchemist_jax.alignment import unit_rows
from alchemist_jax.data.pipeline import padded_batches
from alchemist_jax.data.sources import ArraySource
from alchemist_jax.runtime import preemption, progress
from alchemist_jax.runtime.parallel import model_inputs
from alchemist_jax.scoring.rating_run import RatingRun, ema_rater

HASH_BITS = 64
DCT_SIZE = 32  # pHash: the image is resized to 32 x 32 before the DCT
HASH_SIDE = 8  # and the 8 x 8 lowest frequencies give the 64 bits
# Mean squared deviation (in [-1, 1] units) below which an image region counts as constant: the
# rounding residue of a constant float32 image is ~1e-14; one pixel one gray level off in a
# 28 x 28 image gives ~1e-7.
FLAT_ENERGY = 1e-10


def _dct_matrix(size: int) -> np.ndarray:
    """The orthonormal DCT-II matrix (size, size): `C @ x` transforms the columns of x."""
    k, n = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    matrix = np.sqrt(2.0 / size) * np.cos(np.pi * (2 * n + 1) * k / (2 * size))
    matrix[0] /= np.sqrt(2.0)
    return matrix.astype(np.float32)


@jax.jit
def canonicalize(images: jax.Array) -> jax.Array:
    """Brightness- and shift-normalised grayscale images, the input of both fingerprints.

    images: (B, H, W, C) in [-1, 1] -> (B, H, W) float32: the channel mean minus the background
    level (the median of the border pixels), resampled (bilinear, zero outside) so that the
    centre of mass of its absolute value lies at the image centre. Scaling the brightness scales
    the result; shifting the content (with the background filling in) leaves it unchanged. An
    image without content (all background) gives zeros.
    """
    gray = jnp.mean(images, axis=-1)
    height, width = gray.shape[1:]
    border = jnp.concatenate([gray[:, 0], gray[:, -1], gray[:, 1:-1, 0], gray[:, 1:-1, -1]], axis=1)
    content = gray - jnp.median(border, axis=1)[:, None, None]
    mass = jnp.abs(content)
    total = jnp.sum(mass, axis=(1, 2))
    rows, columns = jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32)
    safe = jnp.where(total > 0, total, 1.0)
    centre_y = jnp.where(total > 0, jnp.einsum("bhw,h->b", mass, rows) / safe, (height - 1) / 2)
    centre_x = jnp.where(total > 0, jnp.einsum("bhw,w->b", mass, columns) / safe, (width - 1) / 2)
    grid_y, grid_x = jnp.meshgrid(rows, columns, indexing="ij")

    def recentre(image, dy, dx):
        coordinates = [grid_y + dy, grid_x + dx]
        return jax.scipy.ndimage.map_coordinates(image, coordinates, order=1, mode="constant")

    return jax.vmap(recentre)(content, centre_y - (height - 1) / 2, centre_x - (width - 1) / 2)


@jax.jit
def phash_bits(canonical: jax.Array) -> jax.Array:
    """The 64-bit DCT perceptual hash (pHash) of each image, as bits.

    canonical: (B, H, W) grayscale (`canonicalize`) -> (B, 64) bool: the image is resized to
    32 x 32 (bilinear), transformed by the orthonormal 2-D DCT-II, and bit 8 u + v is whether
    coefficient (u, v), u, v < 8, exceeds the median of those 64 coefficients. Invariant to a
    positive scaling of the image; an all-zero image hashes to all False.
    """
    resized = jax.image.resize(canonical, (canonical.shape[0], DCT_SIZE, DCT_SIZE), "linear")
    dct = jnp.asarray(_dct_matrix(DCT_SIZE))
    coefficients = jnp.einsum("uh,bhw,vw->buv", dct, resized, dct)
    low = coefficients[:, :HASH_SIDE, :HASH_SIDE].reshape(canonical.shape[0], -1)
    return low > jnp.median(low, axis=1, keepdims=True)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """(N, 64) bool -> (N,) uint64, bit 0 the most significant."""
    packed = np.packbits(np.asarray(bits, bool), axis=1)  # (N, 8) uint8, big-endian bits
    return packed.view(">u8")[:, 0].astype(np.uint64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between packed hashes: uint64 (...) x uint64 (...) -> int (...)."""
    return np.bitwise_count(np.bitwise_xor(a, b))


def _blur_matrix(size: int, std: float) -> np.ndarray:
    """(size, size) Gaussian blur along one axis, truncated at 3 std, zero padding: `M @ x`
    blurs the columns of x."""
    radius = np.ceil(3 * std)
    kernel_sum = np.exp(-0.5 * (np.arange(-radius, radius + 1) / std) ** 2).sum()
    offsets = np.arange(size)[:, None] - np.arange(size)[None, :]
    taps = np.exp(-0.5 * (offsets / std) ** 2) * (np.abs(offsets) <= radius)
    return (taps / kernel_sum).astype(np.float32)


def gaussian_blur(images: jax.Array, std: float) -> jax.Array:
    """(B, H, W) blurred by a Gaussian of `std` pixels (truncated at 3 std, zero padding, as
    two matrix products); unchanged for std 0."""
    if std <= 0:
        return images
    rows = jnp.asarray(_blur_matrix(images.shape[1], std))
    columns = jnp.asarray(_blur_matrix(images.shape[2], std))
    return jnp.einsum("yh,bhw,xw->byx", rows, images, columns)


@functools.partial(jax.jit, static_argnames=("size", "blur"))
def pixel_embeddings(canonical: jax.Array, size: int, blur: float) -> jax.Array:
    """The default embedding: the canonical image, blurred, downsampled, normalised.

    canonical: (B, H, W) (`canonicalize`) -> (B, size * size) float32 with unit L2 norm (zero
    for an image without content): a Gaussian blur of std `blur` pixels (0: none), an
    antialiased bilinear resize to size x size, then the mean removed. The blur and the resize
    make the cosine of two copies tolerant to sub-pixel differences in their re-centring.
    """
    canonical = gaussian_blur(canonical, blur)
    small = jax.image.resize(canonical, (canonical.shape[0], size, size), "linear", antialias=True)
    flat = small.reshape(small.shape[0], -1)
    has_content = jnp.any(canonical != 0, axis=(1, 2))[:, None]
    return unit_rows(jnp.where(has_content, flat - flat.mean(axis=1, keepdims=True), 0.0))


def rater_image_features(
    run: RatingRun, example: dict[str, np.ndarray]
) -> Callable[[dict[str, np.ndarray]], jax.Array]:
    """The learned embedding: `features(batch) -> (B, Dr)` unit-norm image features f of the EMA
    rater of a rating run (`Rater.features`, mean-pooled convolutions: tolerant to shifts).
    `example` is one preprocessed example of the pool (fixes the input shapes)."""
    graphdef, ema, rest = ema_rater(run, example)
    width = run.config.rater.width

    @jax.jit
    def features(params, batch):
        return unit_rows(nnx.merge(graphdef, params, rest).features(batch)[:, :width])

    return lambda batch: features(ema, model_inputs(batch))


@functools.partial(jax.jit, static_argnames=("size", "blur"))
def alignment_images(images: jax.Array, size: int, blur: float) -> jax.Array:
    """The images the final check compares: (B, H, W, C) in [-1, 1] -> (B, h, w) float32, the
    channel mean, shrunk (antialiased) so that no side exceeds `size`, blurred by `blur` px."""
    gray = jnp.mean(images, axis=-1)
    scale = min(1.0, size / max(gray.shape[1:]))
    if scale < 1:
        shape = (
            gray.shape[0],
            max(1, round(gray.shape[1] * scale)),
            max(1, round(gray.shape[2] * scale)),
        )
        gray = jax.image.resize(gray, shape, "linear", antialias=True)
    return gaussian_blur(gray, blur)


@functools.partial(jax.jit, static_argnames=("max_shift", "border"))
def aligned_cosine(first: jax.Array, second: jax.Array, max_shift: int, border: int) -> jax.Array:
    """How well two images match at their best alignment: the final check of a pair.

    first, second: (M, H, W) -> (M,) in [-1, 1]: the largest, over integer shifts (dy, dx)
    with |dy|, |dx| <= max_shift, of the cosine of the mean-removed pixels of first[y, x] and
    second[y + dy, x + dx] over the pixels at least `border` px inside both frames (the band a
    shift or a re-crop fills in). Pearson correlation: invariant to brightness gain and offset;
    0 where a side is constant (`FLAT_ENERGY`). A copy shifted by whole pixels scores ~1 exactly.
    """
    height, width = first.shape[1:]
    best = jnp.full(first.shape[0], -1.0)
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            top, bottom = max(border, border - dy), min(height - border, height - border - dy)
            left, right = max(border, border - dx), min(width - border, width - border - dx)
            if bottom - top < 2 or right - left < 2:
                continue
            a = first[:, top:bottom, left:right]
            b = second[:, top + dy : bottom + dy, left + dx : right + dx]
            a = a - a.mean(axis=(1, 2), keepdims=True)
            b = b - b.mean(axis=(1, 2), keepdims=True)
            energy_a, energy_b = jnp.sum(a * a, axis=(1, 2)), jnp.sum(b * b, axis=(1, 2))
            # Below FLAT_ENERGY a side is constant but for float rounding: no picture to match.
            varied = jnp.minimum(energy_a, energy_b) > FLAT_ENERGY * a[0].size
            norms = jnp.where(varied, jnp.sqrt(energy_a * energy_b), 1.0)
            best = jnp.maximum(best, jnp.where(varied, jnp.sum(a * b, axis=(1, 2)) / norms, 0.0))
    return best


class _Quiet:
    """A progress reporter that reports nothing (`passes(..., show=False)`)."""

    def __init__(self, iterable: Any = None):
        self.iterable = iterable

    def __iter__(self) -> Iterator:
        return iter(self.iterable)

    def update(self, count: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class _Stoppable:
    """A progress reporter that raises `preemption.Preempted` at the next item or update once
    `stop` is requested (nothing of dedup is saved before its one output file)."""

    def __init__(self, bar: Any, stop: preemption.StopRequest, desc: str):
        self.bar, self.stop, self.desc = bar, stop, desc

    def _check(self) -> None:
        if self.stop.requested:
            self.bar.close()
            raise preemption.Preempted(
                f"dedup stopped by {self.stop.signal_name} during {self.desc}; dedup writes its "
                "one file at the end, nothing was saved: rerun the same command"
            )

    def __iter__(self) -> Iterator:
        for item in self.bar:
            self._check()
            yield item

    def update(self, count: int = 1) -> None:
        self.bar.update(count)
        self._check()

    def close(self) -> None:
        self.bar.close()


def passes(
    iterable: Any = None,
    *,
    desc: str,
    stop: preemption.StopRequest | None = None,
    show: bool = True,
    **kwargs: Any,
) -> Any:
    """`progress.bar(iterable, desc=desc, **kwargs)` (nothing when not `show`) that stops
    with `preemption.Preempted` once `stop` (a `preemption.guard`'s request) is set."""
    bar = progress.bar(iterable, desc=desc, **kwargs) if show else _Quiet(iterable)
    return bar if stop is None else _Stoppable(bar, stop, desc)


def fingerprints(
    pool: ArraySource,
    cfg: config_lib.DedupConfig,
    features: Callable[[dict[str, np.ndarray]], jax.Array] | None = None,
    stop: preemption.StopRequest | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """pHashes (N,) uint64 and embeddings (N, D) float32 of a preprocessed pool (`image`
    (N, H, W, C) in [-1, 1]), in fixed-shape batches of `cfg.batch_size` (the last padded:
    `data.pipeline.padded_batches`). `features`: batch -> (B, D) unit-norm embeddings; None:
    `pixel_embeddings`. `stop`: a `preemption.guard` request, checked at every batch."""
    columns = {
        "image": pool.extra["image"],
        **{key: pool.extra[key] for key in ("tokens", "token_mask") if key in pool.extra},
    }
    hashes, embeddings = [], []
    for batch in passes(
        padded_batches(columns, cfg.batch_size),
        desc="dedup fingerprints",
        stop=stop,
        unit="batch",
        total=-(-len(pool) // cfg.batch_size),
    ):
        real = batch.pop("mask")
        canonical = canonicalize(batch["image"])
        embedded = (
            pixel_embeddings(canonical, cfg.embedding_size, cfg.blur)
            if features is None
            else features(batch)
        )
        hashes.append(pack_bits(np.asarray(phash_bits(canonical)))[real])
        embeddings.append(np.asarray(embedded, np.float32)[real])
    return np.concatenate(hashes), np.concatenate(embeddings)
