"""Writes the input of `alchemist-jax prepare` for a large pool of 28x28 grayscale image-caption
pairs: a Parquet manifest of N rows whose image paths point at a few thousand small PNG files.

    python tools/make_large_pool.py --out /work/pools/input --rows 100000 --name pool_100k
    python tools/make_large_pool.py --out /work/pools/input --rows 1000000 --name pool_1m
    python tools/make_large_pool.py --out /work/pools/input --rows 2000 --files 2000 \
        --name pool_val --split validation --id-offset 10000000
    alchemist-jax prepare --source /work/pools/input/pool_100k.parquet --out /work/pools \
        --name pool_100k data.manifest.id_column=id        # (and pool_1m)
    alchemist-jax prepare --source /work/pools/input/pool_val.parquet --out /work/pools \
        --name pool_val --splits validation data.manifest.id_column=id

The PNGs (`<out>/images/<split>/<k>.png`, `--files` of them, mode L) are the first images of a
fixed permutation of the built-in pool's `--split` split (MNIST digits and Animal-MNIST
silhouettes, half each); they are written once and reused by every manifest of that split. Row i
of the manifest has the unique id `--id-offset + i`, the image `images/<split>/<i mod files>.png`
and a caption naming the image's class in varied wording (the built-in templates, prefixes,
suffixes and a per-row detail), so no two rows are the same example even where they share a file.

Columns: `id` int64, `image` (path relative to the manifest), `caption` string. The manifest has
an id column, so `prepare` needs `data.manifest.id_column=id`. A manifest holds one split (it is
read whatever split is asked for), so the pools are prepared with their one `train` split. For the
validation set of a run, prepare the small manifest of the built-in `validation` images (disjoint
from the pool's, other ids) with `--splits validation`, and pass `data.validation_source=<its
folder>`: a TFDS dataset given as `data.validation_source` is read at its `validation` split.

Row checks in `prepare` decode every row's image once, so the cost of `prepare` grows with the
rows, not with the distinct files; fewer files only makes the input smaller on disk.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from alchemist_jax.data import builtin

PREFIXES = ("", "", "", "Photo: ", "image of ", "pic - ", "Stock image: ", "a picture: ")
SUFFIXES = ("", "", ".", "!", " ...", ";", " (grayscale)", ", 28 pixels wide")
DETAILS = (
    "",
    "",
    ", scan {n} from an old notebook",
    ", sample {n} of my collection",
    ", drawn by user{n}",
    ", uploaded {n} days ago",
    ", page {n}, bottom left",
    ", frame {n} of a video",
)
_SEED = 20_260_101
_CHUNK = 100_000  # manifest rows built and written at a time


def write_images(out: Path, split: str, files: int) -> np.ndarray:
    """Writes `files` PNGs of the built-in pool's `split` split (skipping those already there)
    and returns the label of each file, int64 (files,)."""
    source = builtin.pool(split, _pool_config(split, files))
    order = np.random.default_rng(_SEED).permutation(len(source))[:files]
    if len(order) < files:
        raise ValueError(f"the built-in pool's {split} split has only {len(source)} images")
    folder = out / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.empty(files, np.int64)
    for k, index in enumerate(order):
        example = source[int(index)]
        labels[k] = int(example["label"])
        path = folder / f"{k}.png"
        if not path.exists():
            image = np.asarray(example["image"], np.uint8)[:, :, 0]
            Image.fromarray(image, mode="L").save(path, optimize=False)
    return labels


def _pool_config(split: str, files: int):
    """A built-in pool config with the most images the `split` split has (enough for `files`)."""
    from alchemist_jax.config import PoolConfig

    sizes = {"train": 16_000, "validation": 2_000, "test": 2_000}  # 2x Animal-MNIST's split
    size = min(sizes[split], max(files, 2))
    return PoolConfig(train_size=size, validation_size=size, test_size=size)


def _captions(labels: np.ndarray, rows: np.ndarray) -> list[str]:
    captions = []
    for label, row in zip(labels.tolist(), rows.tolist()):
        h = (row * 2_654_435_761) & 0xFFFFFFFF
        text = builtin.caption_for(label, h)
        detail = DETAILS[(h >> 11) % len(DETAILS)].format(n=row % 9973)
        caption = PREFIXES[(h >> 5) % len(PREFIXES)] + text + detail
        caption += SUFFIXES[(h >> 17) % len(SUFFIXES)]
        if (h >> 23) % 5 == 0:
            caption = caption[0].upper() + caption[1:]
        captions.append(caption)
    return captions


def write_manifest(out: Path, name: str, split: str, rows: int, files: int, id_offset: int) -> Path:
    labels = write_images(out, split, files)
    path = out / f"{name}.parquet"
    schema = pa.schema([("id", pa.int64()), ("image", pa.string()), ("caption", pa.string())])
    tmp = path.with_suffix(".parquet.tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, rows, _CHUNK):
            row = np.arange(start, min(start + _CHUNK, rows), dtype=np.int64)
            file = row % files
            table = pa.table(
                {
                    "id": id_offset + row,
                    "image": [f"images/{split}/{k}.png" for k in file.tolist()],
                    "caption": _captions(labels[file], row),
                },
                schema=schema,
            )
            writer.write_table(table)
    tmp.replace(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder of manifests + images/")
    parser.add_argument("--rows", type=int, required=True, help="manifest rows (pool size N)")
    parser.add_argument("--name", required=True, help="the manifest is <out>/<name>.parquet")
    parser.add_argument("--files", type=int, default=4096, help="distinct PNG files")
    parser.add_argument(
        "--split", default="train", choices=builtin.SPLITS, help="built-in split of the images"
    )
    parser.add_argument("--id-offset", type=int, default=0, help="id of the first row")
    args = parser.parse_args()
    start = time.perf_counter()
    path = write_manifest(args.out, args.name, args.split, args.rows, args.files, args.id_offset)
    size = path.stat().st_size / 2**20
    print(
        f"wrote {path} ({args.rows} rows, {size:.1f} MiB; {args.files} PNGs in "
        f"{args.out / 'images' / args.split}) in {time.perf_counter() - start:.1f} s"
    )
    print(
        f"next: alchemist-jax prepare --source {path} --out <pools dir> --name {args.name} "
        "data.manifest.id_column=id"
    )


if __name__ == "__main__":
    main()
