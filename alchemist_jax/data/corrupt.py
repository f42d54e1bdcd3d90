"""Defect injection for benchmarks: a copy of a source with a known fraction of damaged examples.

    noisy, truth = corrupt(source, 0.3, seed=0, truth_path="runs/x/defects.parquet")

`round(fraction * N)` indices are drawn with `numpy.random.default_rng(seed)` and dealt in turn
among the defect `kinds` (so the counts per kind differ by at most one):

  - `noise`: strong gaussian noise (std 100 on the 0..255 scale), clipped to uint8.
  - `blur`: gaussian blur of radius max(1.5, H / 14) (2 for 28 px images).
  - `blank`: one constant gray level, drawn per example.
  - `caption_swap`: the caption of another example with a different label (without labels:
    another example whose caption text differs). The image and label are kept, so the label
    stays the true class of the image and the caption is the wrong one.
  - `duplicate`: the image, caption and label of another, clean example; the id stays its own.
  - `lowres`: downsampled 4x (bilinear), then upsampled back to H x W (nearest): blocky pixels.

Those six are `DEFECT_KINDS`, the default. Opt-in kinds (`ALL_DEFECT_KINDS` lists every kind):

  - `near_duplicate`: the image, caption and label of another, clean example, with the image
    shifted by 1-2 px (one of the 24 non-zero offsets with |dy|, |dx| <= 2, edge pixels
    repeated into the uncovered border) and its brightness scaled by U(0.9, 1.1).

The held-out family `HELDOUT_DEFECT_KINDS`, modelling what crawled and generated data contain
beyond the six (each function's docstring says more):

  - `watermark`: a word ("STOCK", "PREVIEW", ...) tiled across the image in PIL's bitmap font,
    blended in at opacity U(0.4, 0.6), white (black on bright images).
  - `jpeg`: re-encoded as JPEG at quality 5..15 (8x8 blocks, ringing, colour bleeding).
  - `bad_crop`: a corner window of U(0.4, 0.6) of each side, enlarged back (bilinear): the
    subject is cut off.
  - `letterbox`: shrunk by U(0.55, 0.8) (bilinear) onto the middle of a black or white canvas.
  - `boilerplate_caption`: the caption replaced by web boilerplate ("IMG_0412.jpg",
    "click here to download img_0412.jpg", ...).
  - `truncated_caption`: the caption cut after U(0.1, 0.35) of its characters, mid-word.
  - `keyword_stuffing`: the caption's words shuffled into 8-14 search keywords, comma-separated.

`kinds` may also name a family of `DEFECT_FAMILIES`: `tuned` (the six) or `heldout`.

The truth is a pyarrow table with one row per index of the source, in order: `id` int64,
`defect` string (null when clean) and `source_id` int64 (the id whose caption, or image and
caption, was copied; null unless `caption_swap` / `duplicate` / `near_duplicate`).

Size: one function per defect kind, each a few lines, kept together because they share the
seeded selection of victims and the truth table.
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from alchemist_jax.config import ALL_DEFECT_KINDS, DEFECT_FAMILIES, DEFECT_KINDS
from alchemist_jax.data.sources import Source
from alchemist_jax.runtime.io import atomic_write_parquet

NOISE_STD = 100.0  # on the 0..255 scale
LOWRES_FACTOR = 4
COPYING_KINDS = ("caption_swap", "duplicate", "near_duplicate")  # the defects with a `source_id`
IMAGE_COPYING_KINDS = ("duplicate", "near_duplicate")  # take the image and label of their donor
NEAR_DUPLICATE_SHIFTS = tuple(
    (dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if (dy, dx) != (0, 0)
)
NEAR_DUPLICATE_GAIN = (0.9, 1.1)  # brightness factor range
WATERMARK_WORDS = ("STOCK", "SAMPLE", "PREVIEW", "PROOF", "DEMO", "(C) 2019")
WATERMARK_OPACITY = (0.4, 0.6)
WATERMARK_PITCH = (10, 4)  # px between rows of text, px between repeats of the word in a row
JPEG_QUALITY = (5, 15)  # inclusive range of the re-encoding quality
CROP_SIDE = (0.4, 0.6)  # fraction of each side a bad crop keeps
LETTERBOX_SCALE = (0.55, 0.8)  # fraction of each side the shrunk picture keeps
BOILERPLATE_CAPTIONS = (
    "IMG_{number:04d}.jpg",
    "DSC{number:05d}.JPG",
    "click here to download img_{number:04d}.jpg",
    "stock photo id {number}",
    "untitled-{number}",
    "thumbnail",
    "click to enlarge",
    "photo by user{number} on flickr",
    "image not available",
    "view larger image",
)
TRUNCATED_KEEP = (0.1, 0.35)  # fraction of a caption's characters a truncation keeps
SEO_KEYWORDS = (
    "free",
    "download",
    "hd",
    "wallpaper",
    "4k",
    "best",
    "cute",
    "image",
    "photo",
    "picture",
    "stock",
    "background",
    "vector",
    "clipart",
    "png",
    "royalty free",
    "high quality",
    "new",
    "top",
    "amazing",
    "cheap",
    "sale",
    "2019",
    "popular",
    "trending",
    "art",
    "design",
    "ideas",
)
KEYWORD_COUNT = (8, 14)  # inclusive range of keywords stuffed into a caption
STOP_WORDS = frozenset({"a", "an", "the", "of", "on", "in", "at", "with", "and", "to"})


def corrupt(
    source: Source,
    fraction: float,
    kinds: Sequence[str] = DEFECT_KINDS,
    seed: int = 0,
    truth_path: str | Path | None = None,
) -> tuple[CorruptedSource, pa.Table]:
    """Damages `round(fraction * len(source))` examples of `source`, lazily.

    Args:
      source: examples with `image` uint8 (H, W, C) and `caption`; precomputed `latent` /
        `text_embedding` fields are refused, since they would not match the damaged example.
      fraction: in [0, 1].
      kinds: the defects to inject: distinct kinds of `ALL_DEFECT_KINDS` or family names of
        `DEFECT_FAMILIES` (expanded in place).
      seed: picks the examples, their defects, copy sources and each defect's random parameters.
      truth_path: where to also write the truth table as Parquet (atomically), or None.
    Returns:
      (the corrupted source, the truth table described in the module docstring).
    Raises:
      ValueError: an unknown or repeated kind, no kinds, a fraction outside [0, 1], a source
        without images or captions, or no example to copy from.
    """
    kinds = expand_kinds(kinds)
    if not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(f"defect kinds must be one or more distinct kinds, got {kinds}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"corrupt fraction must be in [0, 1], got {fraction}")
    _check_pixels_and_captions(source)

    rng = np.random.default_rng(seed)
    size = len(source)
    defects = np.full(size, None, dtype=object)
    picked = rng.choice(size, size=round(fraction * size), replace=False)  # in random order
    defects[picked] = [kinds[turn % len(kinds)] for turn in range(len(picked))]
    donors = np.full(size, -1, dtype=np.int64)
    _draw_clean_donors(defects, donors, "duplicate", rng)
    labels = source.labels
    for index in np.flatnonzero(defects == "caption_swap"):
        donors[index] = _caption_donor(source, labels, index, rng)
    _draw_clean_donors(defects, donors, "near_duplicate", rng)

    corrupted = CorruptedSource(source, defects, donors, seed)
    truth = corrupted.truth()
    if truth_path is not None:
        atomic_write_parquet(Path(truth_path), truth)
    return corrupted, truth


class CorruptedSource(Source):
    """`base` with defects applied on the fly in `__getitem__` (deterministic per index).

    Same length and ids as `base`. Labels are the true class of each image: the base label,
    except for a `duplicate` / `near_duplicate`, which takes the label of the example it copies.
    Clean examples are returned exactly as `base` returns them.

    Args:
      base: the clean source.
      defects: object (N,): the defect kind of each index, or None when clean.
      donors: int64 (N,): for the `COPYING_KINDS`, the index copied from; else -1.
      seed: seeds each example's random defect parameters, with the index.
    """

    def __init__(self, base: Source, defects: np.ndarray, donors: np.ndarray, seed: int):
        self.base = base
        self.name = f"{base.name}+corrupt"
        self.defects = defects
        self.donors = donors
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        example = self.base[index]
        defect = self.defects[index]
        if defect is None:
            return example
        example = dict(example)
        if defect in COPYING_KINDS:
            donor = self.base[int(self.donors[index])]
            example["caption"] = donor["caption"]
            if defect in IMAGE_COPYING_KINDS:
                example["image"] = donor["image"]
                if "label" in donor:
                    example["label"] = donor["label"]
        rng = np.random.default_rng((self.seed, index))
        if defect in IMAGE_DEFECTS:
            example["image"] = IMAGE_DEFECTS[defect](np.asarray(example["image"]), rng)
        elif defect in CAPTION_DEFECTS:
            example["caption"] = CAPTION_DEFECTS[defect](example["caption"], rng)
        return example

    @property
    def ids(self) -> np.ndarray:
        return self.base.ids

    @property
    def labels(self) -> np.ndarray | None:
        labels = self.base.labels
        if labels is None:
            return None
        copies = np.isin(self.defects, IMAGE_COPYING_KINDS)
        labels = labels.copy()
        labels[copies] = labels[self.donors[copies]]
        return labels

    def truth(self) -> pa.Table:
        """Columns `id` int64, `defect` string, `source_id` int64; one row per index, in order."""
        ids = self.ids
        source_ids = [int(ids[donor]) if donor >= 0 else None for donor in self.donors]
        return pa.table(
            {
                "id": pa.array(ids, pa.int64()),
                "defect": pa.array(list(self.defects), pa.string()),
                "source_id": pa.array(source_ids, pa.int64()),
            }
        )


# ----------------------------------------------------------------------------------------------
# Image defects: uint8 (H, W, C) -> uint8 (H, W, C), drawing from `rng` where random.
# ----------------------------------------------------------------------------------------------


def add_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = image.astype(np.float32) + rng.normal(0.0, NOISE_STD, image.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    radius = max(1.5, image.shape[0] / 14)
    return _per_channel(image, lambda channel: channel.filter(ImageFilter.GaussianBlur(radius)))


def blank(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.full_like(image, rng.integers(0, 256))


def lower_resolution(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    height, width = image.shape[:2]
    small = (max(1, width // LOWRES_FACTOR), max(1, height // LOWRES_FACTOR))
    return _per_channel(
        image,
        lambda channel: channel.resize(small, Image.Resampling.BILINEAR).resize(
            (width, height), Image.Resampling.NEAREST
        ),
    )


def near_duplicate(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A near-copy as re-uploads and re-crops of the same photo make: shifted by a random one of
    `NEAR_DUPLICATE_SHIFTS`, brightness scaled by U(`NEAR_DUPLICATE_GAIN`)."""
    dy, dx = NEAR_DUPLICATE_SHIFTS[rng.integers(len(NEAR_DUPLICATE_SHIFTS))]
    return scale_brightness(shift(image, dy, dx), rng.uniform(*NEAR_DUPLICATE_GAIN))


def shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """(H, W, C) content moved `dy` px down and `dx` px right (negative: up / left); the
    uncovered border repeats the nearest edge pixel."""
    height, width = image.shape[:2]
    rows = np.clip(np.arange(height) - dy, 0, height - 1)
    columns = np.clip(np.arange(width) - dx, 0, width - 1)
    return image[rows][:, columns]


def scale_brightness(image: np.ndarray, gain: float) -> np.ndarray:
    """uint8 `image` times `gain`, rounded to nearest and clipped to 0..255."""
    return np.clip(np.rint(image.astype(np.float64) * gain), 0, 255).astype(np.uint8)


def watermark(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A stock-photo or site watermark: one of `WATERMARK_WORDS` tiled across the image (rows
    `WATERMARK_PITCH` apart, each row shifted half a word, from a random offset) and blended in at
    opacity U(`WATERMARK_OPACITY`), in white, or in black when the image's mean is >= 128."""
    word = WATERMARK_WORDS[rng.integers(len(WATERMARK_WORDS))]
    opacity = rng.uniform(*WATERMARK_OPACITY)
    offset = (int(rng.integers(WATERMARK_PITCH[0])), int(rng.integers(2 * WATERMARK_PITCH[0])))
    ink = 0 if image.mean() >= 128 else 255
    return blend(image, tiled_text_mask(image.shape[:2], word, offset), ink, opacity)


def tiled_text_mask(shape: tuple[int, int], word: str, offset: tuple[int, int]) -> np.ndarray:
    """bool (H, W): where `word`, tiled in PIL's built-in bitmap font (about 6 px a letter, the
    same on every platform), covers an H x W image. The first row starts `offset` = (up, left) px
    outside the top-left corner; images over 64 px draw the font scaled by min(H, W) // 64."""
    height, width = shape
    scale = max(1, min(height, width) // 64)
    canvas = Image.new("L", (-(-width // scale), -(-height // scale)))
    draw, font = ImageDraw.Draw(canvas), _bitmap_font()
    row_pitch = WATERMARK_PITCH[0]
    word_pitch = font.getbbox(word)[2] + WATERMARK_PITCH[1]
    for row, top in enumerate(range(-offset[0], canvas.height, row_pitch)):
        start = -offset[1] - (row * word_pitch // 2) % word_pitch
        for left in range(start, canvas.width, word_pitch):
            draw.text((left, top), word, fill=255, font=font)
    mask = np.asarray(canvas) > 0
    return mask.repeat(scale, axis=0).repeat(scale, axis=1)[:height, :width]


@functools.cache
def _bitmap_font() -> ImageFont.ImageFont:
    return ImageFont.load_default_imagefont()


def blend(image: np.ndarray, mask: np.ndarray, ink: int, opacity: float) -> np.ndarray:
    """uint8 (H, W, C) with the pixels under bool `mask` (H, W) replaced by
    rint((1 - opacity) * pixel + opacity * ink)."""
    mixed = np.rint((1.0 - opacity) * image.astype(np.float64) + opacity * ink).astype(np.uint8)
    return np.where(mask[..., None], mixed, image)


def jpeg(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A heavily re-compressed web image (re-uploads, thumbnails, messaging apps): encoded as JPEG
    at a quality drawn from `JPEG_QUALITY` and decoded (8x8 blocks, ringing, and for RGB chroma
    subsampled 4:2:0)."""
    return jpeg_roundtrip(image, int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1)))


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """uint8 (H, W, C), C = 1 or 3, encoded as JPEG at `quality` (1..95) by Pillow and decoded."""
    encoded = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
        encoded, format="JPEG", quality=quality
    )
    return np.asarray(Image.open(encoded)).reshape(image.shape)


def bad_crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A crop that cuts the subject off (automatic square / thumbnail crops of off-centre
    subjects): a window of round(U(`CROP_SIDE`) x side) px of each side at a random corner,
    enlarged back to H x W (bilinear)."""
    height, width = image.shape[:2]
    side = rng.uniform(*CROP_SIDE)
    crop_height, crop_width = max(1, round(side * height)), max(1, round(side * width))
    corner = int(rng.integers(4))
    top = 0 if corner < 2 else height - crop_height
    left = 0 if corner % 2 == 0 else width - crop_width
    box = (left, top, left + crop_width, top + crop_height)
    return _per_channel(
        image, lambda channel: channel.crop(box).resize((width, height), Image.Resampling.BILINEAR)
    )


def letterbox(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A picture fitted into a larger frame (letter- / pillar-boxed video frames, product shots
    and thumbnails on a plain canvas, screenshots with margins): shrunk to round(U(
    `LETTERBOX_SCALE`) x side) px per side (bilinear) and centred on a black or white canvas."""
    height, width = image.shape[:2]
    scale = rng.uniform(*LETTERBOX_SCALE)
    level = 255 * int(rng.integers(2))
    inner_height, inner_width = max(1, round(scale * height)), max(1, round(scale * width))
    shrunk = _per_channel(
        image,
        lambda channel: channel.resize((inner_width, inner_height), Image.Resampling.BILINEAR),
    )
    framed = np.full_like(image, level)
    top, left = (height - inner_height) // 2, (width - inner_width) // 2
    framed[top : top + inner_height, left : left + inner_width] = shrunk
    return framed


IMAGE_DEFECTS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "noise": add_noise,
    "blur": blur,
    "blank": blank,
    "lowres": lower_resolution,
    "near_duplicate": near_duplicate,
    "watermark": watermark,
    "jpeg": jpeg,
    "bad_crop": bad_crop,
    "letterbox": letterbox,
}


def _per_channel(image: np.ndarray, edit: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    """Applies a PIL edit to each channel of uint8 (H, W, C) as a grayscale image."""
    channels = [
        np.asarray(edit(Image.fromarray(np.ascontiguousarray(image[..., c]))))
        for c in range(image.shape[-1])
    ]
    return np.stack(channels, axis=-1)


# ----------------------------------------------------------------------------------------------
# Caption defects: str -> str, drawing from `rng`.
# ----------------------------------------------------------------------------------------------


def boilerplate_caption(caption: str, rng: np.random.Generator) -> str:
    """Alt text that describes nothing (file names, link text, stock-site ids), as crawled pages
    often carry: one of `BOILERPLATE_CAPTIONS`, numbered with a random 0..9999."""
    template = BOILERPLATE_CAPTIONS[rng.integers(len(BOILERPLATE_CAPTIONS))]
    return template.format(number=int(rng.integers(10_000)))


def truncated_caption(caption: str, rng: np.random.Generator) -> str:
    """A caption cut at a length limit (crawlers' and HTML attributes' character limits): its first
    max(1, floor(U(`TRUNCATED_KEEP`) x length)) characters, mid-word as it falls."""
    return caption[: max(1, int(rng.uniform(*TRUNCATED_KEEP) * len(caption)))]


def keyword_stuffing(caption: str, rng: np.random.Generator) -> str:
    """Search-engine-optimised alt text: the caption's distinct lower-cased words (stop words
    dropped) shuffled together with 8-14 distinct `SEO_KEYWORDS`, joined by ", ", so the
    description drowns among tags (and often falls beyond the text encoder's token limit)."""
    words = [
        word
        for word in dict.fromkeys(re.findall(r"[\w']+", caption.lower()))
        if word not in STOP_WORDS
    ]
    count = int(rng.integers(KEYWORD_COUNT[0], KEYWORD_COUNT[1] + 1))
    tags = words + [str(keyword) for keyword in rng.choice(SEO_KEYWORDS, count, replace=False)]
    return ", ".join(tags[i] for i in rng.permutation(len(tags)))


CAPTION_DEFECTS: dict[str, Callable[[str, np.random.Generator], str]] = {
    "boilerplate_caption": boilerplate_caption,
    "truncated_caption": truncated_caption,
    "keyword_stuffing": keyword_stuffing,
}


# ----------------------------------------------------------------------------------------------
# Checks and copy sources
# ----------------------------------------------------------------------------------------------


def expand_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    """`kinds` with each family name of `DEFECT_FAMILIES` replaced by its kinds, in order.

    Raises:
      ValueError: a name that is neither a kind of `ALL_DEFECT_KINDS` nor a family.
    """
    unknown = [kind for kind in kinds if kind not in ALL_DEFECT_KINDS + tuple(DEFECT_FAMILIES)]
    if unknown:
        raise ValueError(
            f"unknown defect kind {', '.join(map(repr, unknown))}; valid kinds: "
            f"{', '.join(ALL_DEFECT_KINDS)}; families: {', '.join(DEFECT_FAMILIES)}"
        )
    return tuple(kind for name in kinds for kind in DEFECT_FAMILIES.get(name, (name,)))


def _check_pixels_and_captions(source: Source) -> None:
    """Refuses sources whose examples lack pixels or captions, or carry precomputed inputs."""
    if not len(source):
        return
    fields = source[0].keys()
    if not {"image", "caption"} <= fields or {"latent", "text_embedding"} & fields:
        raise ValueError(
            f"corrupt needs examples with `image` and `caption` and no precomputed "
            f"`latent` / `text_embedding`; {source!r} has {', '.join(fields)}"
        )


def _draw_clean_donors(
    defects: np.ndarray, donors: np.ndarray, kind: str, rng: np.random.Generator
) -> None:
    """Sets `donors` of the `kind` examples to random clean indices (with replacement)."""
    copies = np.flatnonzero(defects == kind)
    if not len(copies):
        return
    clean = np.flatnonzero(defects == None)  # noqa: E711 (elementwise on an object array)
    if not len(clean):
        raise ValueError(f"`{kind}` needs clean examples to copy; lower the corrupt fraction")
    donors[copies] = rng.choice(clean, size=len(copies))


def _caption_donor(
    source: Source, labels: np.ndarray | None, index: int, rng: np.random.Generator
) -> int:
    """A random other index whose caption text differs, with a different label if labeled."""
    if labels is None:
        others = np.delete(np.arange(len(source)), index)
    else:
        others = np.flatnonzero(labels != labels[index])
    caption = source[index]["caption"]
    for other in rng.permutation(others):
        if source[int(other)]["caption"] != caption:
            return int(other)
    raise ValueError(
        f"`caption_swap` found no example with a different caption"
        f"{' and label' if labels is not None else ''} for index {index}"
    )
