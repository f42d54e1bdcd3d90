"""`alchemist-jax encode`: any source -> a TFDS array_record dataset of VAE latents and CLIP text
hidden states, the inputs of latent diffusion training.

Per example of each split:
  id              int64
  latent          float32 (h, w, c): the VAE posterior mean, scaled as the checkpoint's
                  `(mean - shift_factor) * scaling_factor` (`models.vae.scale_latents`), NHWC;
                  h = w = encode.image_size / f (f = 8 for the SD/SDXL/FLUX VAEs)
  latent_std      float32 (h, w, c), with `encode.store_std`: the posterior std * scaling_factor
  text_embedding  float32 (L, D): the CLIP text tower's `encode.hidden_layer` hidden states
  token_mask      bool (L,): True up to and including the end-of-text token (the DiT and rater
                  read this name next to `text_embedding`)
  caption, label  kept when the source has them (captions for the sample grid and CLIP score,
                  labels for FCD / alignment and caption-class grouping)

Images are resized (shorter side) and center-cropped to `encode.image_size`² RGB, scaled to
[-1, 1]; captions are tokenized by the CLIP folder's tokenizer. The VAE comes from a local
diffusers `AutoencoderKL` folder (`models.vae`: SD 1.x/2.x/SDXL and FLUX/SD3 layouts; other
classes are refused by name), the text tower from a local HF CLIP folder (`models.clip`).

Resuming, as `score`: each split is cut into chunks of `encode.chunk_size` samples (whole
batches), each encoded in fixed-shape batches (`data.pipeline.padded_batches`) and written
atomically to `<out>/.<name>.encode/<split>/<chunk>.npz` with the fingerprint of everything it
depends on (source, split, ids, both checkpoints, image size, hidden layer, std); a rerun keeps
the chunks of the same fingerprint. When every split is done, the dataset is written by
`data.tfds_dataset.prepare_tfds` (built aside, moved into place) with `alchemist_encode.json`
(fingerprint, shapes, throughput) and the chunk folder is removed; a rerun of a finished encode
does nothing.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from alchemist_jax import config as config_lib
from alchemist_jax.data import load
from alchemist_jax.data.pipeline import padded_batches
from alchemist_jax.data.preprocess import resize_center_crop, to_unit_range
from alchemist_jax.data.sources import ArraySource, Source
from alchemist_jax.data.tfds_dataset import prepare_tfds
from alchemist_jax.models import clip as clip_lib
from alchemist_jax.models import vae as vae_lib
from alchemist_jax.runtime import io as io_lib
from alchemist_jax.runtime import progress

log = logging.getLogger("alchemist_jax.encoding")

MARKER = "alchemist_encode.json"  # in the finished dataset folder: what it was encoded from
VERSION = "1.0.0"


class Encoder:
    """The loaded VAE and CLIP text tower, and the jitted functions of a batch.

    Args:
      cfg: the `encode` section (vae_path, clip_path, hidden_layer, store_std, image_size).
    Raises:
      ConfigError: a path is unset; ValueError (one line, naming the folder): an unreadable or
        unsupported checkpoint, or an image size the VAE cannot downsample.
    """

    def __init__(self, cfg: config_lib.EncodeConfig):
        for key in ("vae_path", "clip_path"):
            if getattr(cfg, key) is None:
                raise config_lib.ConfigError(
                    f"encode needs encode.{key}=DIR (a local "
                    f"{'diffusers AutoencoderKL' if key == 'vae_path' else 'HF CLIP'} folder)"
                )
        self.cfg = cfg
        self.vae = vae_lib.load_vae(cfg.vae_path)
        if self.vae.config.in_channels != 3:
            raise ValueError(
                f"{cfg.vae_path}: in_channels={self.vae.config.in_channels}; encode needs an "
                "RGB VAE (in_channels 3)"
            )
        factor = self.vae.config.downsampling
        if cfg.image_size % factor:
            raise config_lib.ConfigError(
                f"encode.image_size={cfg.image_size} is not divisible by the VAE's "
                f"downsampling factor {factor} ({cfg.vae_path})"
            )
        self.clip = clip_lib.load_clip(cfg.clip_path)
        self._encode = vae_lib.encode_fn(self.vae)
        self._embed = clip_lib.text_hidden_states_fn(self.clip, cfg.hidden_layer)

    def fingerprint(self) -> dict[str, Any]:
        """What an encoded sample depends on besides its own image and caption."""

        def checkpoint(directory: Path) -> dict[str, Any]:
            files = sorted(p for p in Path(directory).iterdir() if p.is_file())
            return {
                "folder": str(Path(directory).resolve()),
                "files": {p.name: p.stat().st_size for p in files},
                "config": (Path(directory) / "config.json").read_text(),
            }

        return {
            "vae": checkpoint(self.vae.directory),
            "clip": checkpoint(self.clip.directory),
            "hidden_layer": self.cfg.hidden_layer,
            "store_std": self.cfg.store_std,
            "image_size": self.cfg.image_size,
        }

    def pixels(self, example: dict[str, Any]) -> np.ndarray:
        """An example's image -> float32 (S, S, 3) in [-1, 1], S = encode.image_size."""
        if "image" not in example:
            raise ValueError(f"example {int(example['id'])} has no image to encode")
        image = resize_center_crop(np.asarray(example["image"]), self.cfg.image_size, 3)
        return to_unit_range(image)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """A batch {image (B, S, S, 3) float32, tokens (B, L) int32} -> (not yet computed) jax
        arrays: latent (B, h, w, c) scaled, latent_std (with store_std), text_embedding
        (B, L, D) float32, token_mask (B, L) bool."""
        mean, std = self._encode(self.vae.params, batch["image"])
        states, mask = self._embed(self.clip.params, batch["tokens"])
        out = {
            "latent": vae_lib.scale_latents(mean, self.vae.config),
            "text_embedding": states,
            "token_mask": mask,
        }
        if self.cfg.store_std:
            out["latent_std"] = std * self.vae.config.scaling_factor
        return out


def _read_chunk(path: Path, fingerprint: str, ids: np.ndarray) -> dict[str, np.ndarray] | None:
    """The arrays of a finished chunk file of exactly `ids` under `fingerprint`, else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {key: stored[key] for key in stored.files}
    except (OSError, ValueError):
        return None
    if str(arrays.pop("fingerprint", "")) != fingerprint or not np.array_equal(
        arrays.get("id"), ids
    ):
        return None
    return arrays


def _write_chunk(path: Path, arrays: dict[str, np.ndarray], fingerprint: str) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays, fingerprint=np.array(fingerprint))
    io_lib.atomic_write_bytes(path, buffer.getvalue())


def encode_split(
    encoder: Encoder,
    source: Source,
    folder: Path,
    fingerprint: dict[str, Any],
    bar: Any,
) -> tuple[dict[str, np.ndarray], int]:
    """Encodes every example of `source` into chunk files under `folder` (resumable; see the
    module docstring).

    Returns:
      (columns, encoded): the split's columns in source order — id (N,), latent (N, h, w, c),
      [latent_std], text_embedding (N, L, D), token_mask (N, L), caption (N,) str and label
      (N,) when the source has them — and how many samples this call encoded (not resumed).
    """
    batch_size, chunk_size = encoder.cfg.batch_size, encoder.cfg.chunk_size
    chunk_size = -(-chunk_size // batch_size) * batch_size  # whole batches: no padding inside
    ids = np.asarray(source.ids, np.int64)
    parts, encoded = [], 0
    for index, start in enumerate(range(0, len(source), chunk_size)):
        stop = min(start + chunk_size, len(source))
        path = folder / f"{index:05d}.npz"
        key = io_lib.fingerprint({**fingerprint, "chunk": [start, stop]})
        arrays = _read_chunk(path, key, ids[start:stop])
        if arrays is None:
            examples = [source[i] for i in range(start, stop)]
            captions = [str(example.get("caption", "")) for example in examples]
            if not all(captions):
                raise ValueError(
                    f"{source.name}: an example in rows {start}..{stop - 1} has no caption"
                )
            rows = {
                "id": ids[start:stop],
                "image": np.stack([encoder.pixels(example) for example in examples]),
                "tokens": encoder.clip.tokenize(captions),
            }
            # Every batch is dispatched before the first result is read back (async dispatch).
            pending = [
                (encoder(batch), batch["mask"]) for batch in padded_batches(rows, batch_size)
            ]
            outputs: dict[str, list[np.ndarray]] = {}
            for result, mask in pending:
                for name, value in result.items():
                    outputs.setdefault(name, []).append(np.asarray(value)[mask])
                bar.update(int(mask.sum()))
            arrays = {"id": rows["id"], **{k: np.concatenate(v) for k, v in outputs.items()}}
            arrays["token_mask"] = arrays["token_mask"].astype(np.bool_)
            arrays["caption"] = np.array(captions)
            if source.labels is not None:
                arrays["label"] = np.asarray(source.labels[start:stop], np.int64)
            _write_chunk(path, arrays, key)
            encoded += stop - start
        else:
            bar.update(stop - start)
        parts.append(arrays)
    columns = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    return columns, encoded


def _as_source(name: str, columns: dict[str, np.ndarray]) -> ArraySource:
    columns = dict(columns)
    ids, captions, labels = columns.pop("id"), columns.pop("caption"), columns.pop("label", None)
    return ArraySource(name, ids, None, [str(c) for c in captions], labels, extra=columns)


def run(
    cfg: config_lib.Config,
    source: str,
    out: str | Path,
    *,
    splits: tuple[str, ...] = ("train",),
    name: str = "alchemist_dataset",
    overwrite: bool = False,
) -> dict[str, Any]:
    """`alchemist-jax encode`: encodes `splits` of `source` into `out/name/1.0.0` (see the module
    docstring) and returns the summary also stored there as `alchemist_encode.json`.

    Args:
      cfg: `encode` (checkpoints and settings) and `data` (manifest columns, built-in sizes).
      source: built-in name, manifest, image folder or TFDS directory (`data.load`).
      out: the TFDS data dir.
      splits: split names (manifests and image folders hold one: `train`).
      name: the dataset name (lower snake_case).
      overwrite: replace a finished dataset encoded with other settings.
    Raises:
      FileExistsError: the target holds a dataset encoded otherwise and `overwrite` is False.
    """
    out = Path(out)
    target = out / name / VERSION
    encoder = Encoder(cfg.encode)
    sources = {split: load(source, split, config=cfg.data, report_dir=out) for split in splits}
    fingerprint = {
        "encoder": encoder.fingerprint(),
        "source": str(source),
        "splits": {split: io_lib.fingerprint(s.ids.tolist()) for split, s in sources.items()},
    }
    key = io_lib.fingerprint(fingerprint)
    marker = target / MARKER
    if marker.is_file():
        summary = io_lib.read_json(marker)
        if summary.get("fingerprint") == key:
            log.info("%s is complete (encoded from %s)", target, source)
            return summary
    folder = out / f".{name}.encode"
    if target.exists() and not overwrite and not folder.exists():
        raise FileExistsError(
            f"{target} already exists and was not encoded with these settings; pass --overwrite "
            "to replace it"
        )
    total = sum(len(s) for s in sources.values())
    started = time.perf_counter()
    columns, encoded = {}, 0
    with progress.bar(total=total, desc="encode", unit="sample") as bar:
        for split, split_source in sources.items():
            if len(split_source) == 0:
                raise ValueError(f"split {split!r} of {source} is empty")
            split_key = {**fingerprint, "split": split}
            columns[split], count = encode_split(
                encoder, split_source, folder / split, split_key, bar
            )
            encoded += count
    seconds = time.perf_counter() - started
    first = next(iter(columns.values()))
    summary = {
        "fingerprint": key,
        "source": str(source),
        "splits": {split: int(len(c["id"])) for split, c in columns.items()},
        "vae_path": str(cfg.encode.vae_path),
        "clip_path": str(cfg.encode.clip_path),
        "hidden_layer": cfg.encode.hidden_layer,
        "image_size": cfg.encode.image_size,
        "latent_shape": list(first["latent"].shape[1:]),
        "text_embedding_shape": list(first["text_embedding"].shape[1:]),
        "latent_std": cfg.encode.store_std,
        "encoded_samples": encoded,
        "encode_seconds": round(seconds, 2),
        "samples_per_second": round(encoded / seconds, 2) if encoded else None,
        "batch_size": cfg.encode.batch_size,
    }
    log.info(
        "encoded %d samples in %.1f s (%s samples/s; %d resumed from chunks)",
        encoded,
        seconds,
        summary["samples_per_second"],
        total - encoded,
    )
    path = prepare_tfds(
        {split: _as_source(f"{source}/{split}", c) for split, c in columns.items()},
        out,
        name=name,
        overwrite=True,
    )
    io_lib.atomic_write_json(path / MARKER, summary)
    shutil.rmtree(folder, ignore_errors=True)
    log.info("wrote %s (%s)", path, json.dumps(summary["splits"]))
    return summary
