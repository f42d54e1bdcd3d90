"""Builds a web-like pool for selection benchmarks: a Parquet manifest + PNG images + a truth table.

    python tools/make_web_pool.py build --out /tmp/web --size 6000 --seed 0
    python tools/make_web_pool.py measure --truth /tmp/web/truth.parquet --out /tmp/web/sel \
        --ratings /tmp/web/alignment.parquet /tmp/web/rater.parquet --dedup /tmp/web/dedup.parquet \
        -- data.source=/tmp/web/pool.parquet data.validation_source=/tmp/web/validation.parquet \
        data.manifest.id_column=id data.corrupt.fraction=0

`measure` runs `alchemist-jax select` (the command line, so the pool is read as the manifest a
user would give) once per `select.ranking` and prints, per ranking, the clean precision of the
selection, its expectation over the policy's random draw and the expected fraction of each family
kept (exact, `selection.inclusion_for_source`; truth: `truth.parquet` here, or the
`defects.parquet` of a pipeline run: column `defect`, null = clean). Compare rankings by the
expectation: the `filter` policy's uniform fill moves one draw's clean share by a standard
deviation of 0.004-0.008 on these pools (docs/RESULTS.md), as much as rankings differ.

Images come from the built-in sources (MNIST digits and Animal-MNIST silhouettes, `train` split
for the pool, `validation` for the clean validation set, `test` for the test set); captions are
free text, unlike the built-in pool's templates. Families of the pool (fractions of `--size`):

  clean_template  0.50  a templated caption with surface variation: wording (the built-in
                        templates), case (lower / Title / UPPER), punctuation, prefixes, spaces
  clean_unique    0.20  a templated caption plus a unique detail ("..., scan 4821 from a
                        notebook"): every caption differs; the sample is fine
  negative        0.06  defect: the image inverted (255 - x), caption fine
  occluded        0.06  defect: a flat rectangle of 45-70% of each side hides part of the image
  collage         0.06  defect: a 2x2 mosaic of four other images, caption of the first
  junk_caption    0.06  defect: the caption replaced by unique word salad ("lorem dolor 7341
                        amet ...")
  wrong_unique    0.06  defect: a unique caption (as in clean_unique) that names another class

None of the five defect kinds is one of `data.corrupt`'s (tuned or held-out). Outputs in `--out`:
`pool.parquet`, `validation.parquet`, `test.parquet` (columns `id` int64, `image` a path relative
to the manifest, `caption`), `images/*.png` and `truth.parquet` (`id`, `family`, `defective`),
which the CLI never sees.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from alchemist_jax.data import builtin

FAMILIES = {
    "clean_template": 0.50,
    "clean_unique": 0.20,
    "negative": 0.06,
    "occluded": 0.06,
    "collage": 0.06,
    "junk_caption": 0.06,
    "wrong_unique": 0.06,
}
DEFECTIVE = ("negative", "occluded", "collage", "junk_caption", "wrong_unique")
PREFIXES = ("", "", "", "Photo: ", "image of ", "pic - ", "Stock image: ")
SUFFIXES = ("", "", ".", "!", " ...", " :)", ";")
DETAILS = (
    "scan {n} from an old notebook",
    "sample {n} of my collection",
    "drawn by user{n}",
    "uploaded {n} days ago",
    "page {n}, bottom left",
    "frame {n} of a video",
    "found in folder {n}",
)
JUNK = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt "
    "labore magna aliqua enim minim veniam quis nostrud exercitation ullamco laboris"
).split()


def _class_name(label: int) -> str:
    if label < builtin.ANIMALS_LABEL_OFFSET:
        return builtin.DIGITS[label]
    return builtin.ANIMALS[label - builtin.ANIMALS_LABEL_OFFSET]


def _template(label: int, rng: np.random.Generator) -> str:
    templates = (
        builtin.MNIST_TEMPLATES
        if label < builtin.ANIMALS_LABEL_OFFSET
        else builtin.ANIMAL_TEMPLATES
    )
    return templates[rng.integers(len(templates))].format(name=_class_name(label), digit=label)


def surface(caption: str, rng: np.random.Generator) -> str:
    """The caption with random case, prefix, punctuation and doubled spaces."""
    case = rng.integers(4)
    caption = (caption, caption.capitalize(), caption.title(), caption.upper())[case]
    caption = (
        PREFIXES[rng.integers(len(PREFIXES))] + caption + SUFFIXES[rng.integers(len(SUFFIXES))]
    )
    if rng.random() < 0.2:
        caption = caption.replace(" ", "  ", 1)
    return caption


def unique(caption: str, rng: np.random.Generator, serial: int) -> str:
    detail = DETAILS[rng.integers(len(DETAILS))].format(n=serial)
    return surface(f"{caption}, {detail}", rng)


def junk(rng: np.random.Generator, serial: int) -> str:
    words = list(rng.choice(JUNK, size=rng.integers(4, 8), replace=False))
    words.insert(int(rng.integers(len(words))), str(serial))
    return " ".join(words)


def occlude(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    height, width = image.shape[:2]
    h = int(round(height * rng.uniform(0.45, 0.7)))
    w = int(round(width * rng.uniform(0.45, 0.7)))
    top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
    out = image.copy()
    out[top : top + h, left : left + w] = 0 if rng.random() < 0.5 else 255
    return out


def collage(images: list[np.ndarray]) -> np.ndarray:
    size = images[0].shape[0]
    half = size // 2
    tiles = [
        np.asarray(Image.fromarray(im[..., 0]).resize((half, half), Image.BILINEAR))
        for im in images
    ]
    out = np.zeros((size, size), np.uint8)
    for k, tile in enumerate(tiles):
        out[(k // 2) * half : (k // 2 + 1) * half, (k % 2) * half : (k % 2 + 1) * half] = tile
    return out[..., None]


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0]).save(buffer, format="PNG")
    return buffer.getvalue()


def _draw(split: str, size: int, rng: np.random.Generator):
    """(ids, images, labels) of `size` examples, half MNIST, half Animal-MNIST."""
    parts = [builtin.mnist(split), builtin.animals(split)]
    ids, images, labels = [], [], []
    for offset, part in enumerate(parts):
        share = (size + 1 - offset) // 2
        chosen = np.sort(rng.choice(len(part), size=share, replace=False))
        taken = part.take(chosen)
        ids.append(np.asarray(taken.ids))
        images.append(np.stack([taken[i]["image"] for i in range(len(taken))]))
        labels.append(np.asarray(taken.labels))
    return np.concatenate(ids), np.concatenate(images), np.concatenate(labels)


def write_split(out: Path, name: str, ids, images, captions) -> None:
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for sample_id, image in zip(ids, images):
        path = folder / f"{name}_{int(sample_id)}.png"
        path.write_bytes(_png(image))
        paths.append(f"images/{path.name}")
    table = pa.table({"id": pa.array(ids, pa.int64()), "image": paths, "caption": list(captions)})
    pq.write_table(table, out / f"{name}.parquet")


def read_truth(path: Path) -> dict[int, str]:
    """id -> family ("clean" for clean samples) of a truth.parquet or a defects.parquet."""
    table = pq.read_table(path).to_pydict()
    if "family" in table:
        families = [f if not f.startswith("clean") else "clean" for f in table["family"]]
    else:
        families = [d if d is not None else "clean" for d in table["defect"]]
    return dict(zip(table["id"], families))


def measure(args: argparse.Namespace) -> None:
    import json
    import subprocess
    import sys

    from alchemist_jax.config import load_config
    from alchemist_jax.data import load_splits
    from alchemist_jax.dedup import read_groups
    from alchemist_jax.selection import inclusion_for_source, read_ratings

    truth = read_truth(args.truth)
    families = sorted(set(truth.values()) - {"clean"})
    totals = {f: sum(1 for v in truth.values() if v == f) for f in ["clean", *families]}
    ratings = {str(path): read_ratings(path) for path in args.ratings}
    duplicates = None if args.dedup is None else (str(args.dedup), read_groups(args.dedup))
    pool = None
    args.out.mkdir(parents=True, exist_ok=True)
    header = ["ranking", "clean precision", "expected", "weights", *(f"kept {f}" for f in totals)]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name in args.rankings:
        out = args.out / f"{name}.parquet"
        overrides = [f"select.ranking={name}", *args.overrides]
        command = [
            str(Path(sys.executable).with_name("alchemist-jax")),
            "select",
            "--config",
            args.config,
            "--ratings",
            *map(str, args.ratings),
            *(["--dedup", str(args.dedup)] if args.dedup else []),
            "--out",
            str(out),
            *overrides,
        ]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        chosen = [truth[i] for i in pq.read_table(out).column("id").to_pylist()]
        summary = json.loads(out.with_suffix(".json").read_text())
        cfg = load_config(args.config, overrides)
        pool = pool or load_splits(cfg.data).train  # the overrides' data section is shared
        ids, probabilities = inclusion_for_source(cfg.select, ratings, pool, duplicates=duplicates)
        family = np.array([truth[int(i)] for i in ids])
        kept = [f"{probabilities[family == f].sum() / totals[f]:.3f}" for f in totals]
        expected = probabilities[family == "clean"].sum() / probabilities.sum()
        weights = "/".join(f"{w:.2f}" for w in summary["weights"])
        precision = chosen.count("clean") / len(chosen)
        print(
            f"| {name} | {precision:.4f} | {expected:.4f} | {weights} | " + " | ".join(kept) + " |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="write the pool")
    build.add_argument("--out", type=Path, required=True)
    build.add_argument("--size", type=int, default=6000, help="pool samples")
    build.add_argument("--validation-size", type=int, default=1000)
    build.add_argument("--test-size", type=int, default=500)
    build.add_argument("--seed", type=int, default=0)
    check = commands.add_parser("measure", help="clean precision of each select.ranking")
    check.add_argument("--truth", type=Path, required=True)
    check.add_argument("--ratings", type=Path, nargs="+", required=True)
    check.add_argument("--dedup", type=Path, default=None)
    check.add_argument("--out", type=Path, required=True)
    check.add_argument("--config", default="configs/demo.yaml")
    check.add_argument("--rankings", nargs="+", default=["shrunk", "global", "within"])
    check.add_argument("overrides", nargs="*", help="config overrides (after --)")
    args = parser.parse_args()
    if args.command == "measure":
        measure(args)
    else:
        write_pool(args)


def write_pool(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    ids, images, labels = _draw("train", args.size, rng)
    counts = {f: int(round(share * args.size)) for f, share in FAMILIES.items()}
    counts["clean_template"] += args.size - sum(counts.values())
    families = rng.permutation(np.repeat(list(counts), list(counts.values())))
    captions, edited = [], images.copy()
    for n, (family, label) in enumerate(zip(families, labels)):
        serial = int(rng.integers(1000, 99999))
        if family == "clean_unique":
            captions.append(unique(_template(int(label), rng), rng, serial))
        elif family == "wrong_unique":
            other = int(rng.choice([c for c in np.unique(labels) if c != label]))
            captions.append(unique(_template(other, rng), rng, serial))
        elif family == "junk_caption":
            captions.append(junk(rng, serial))
        else:
            captions.append(surface(_template(int(label), rng), rng))
        if family == "negative":
            edited[n] = 255 - images[n]
        elif family == "occluded":
            edited[n] = occlude(images[n], rng)
        elif family == "collage":
            others = rng.choice(len(images), size=3, replace=False)
            edited[n] = collage([images[n], *(images[o] for o in others)])
    write_split(args.out, "pool", ids, edited, captions)
    truth = pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "family": [str(f) for f in families],
            "defective": [str(f) in DEFECTIVE for f in families],
        }
    )
    pq.write_table(truth, args.out / "truth.parquet")
    for split, size in (("validation", args.validation_size), ("test", args.test_size)):
        split_ids, split_images, split_labels = _draw(split, size, rng)
        split_captions = [surface(_template(int(label), rng), rng) for label in split_labels]
        write_split(args.out, split, split_ids, split_images, split_captions)
    print(
        f"wrote {args.out}: pool {args.size} ("
        + ", ".join(f"{f} {c}" for f, c in counts.items())
        + f"), validation {args.validation_size}, test {args.test_size}"
    )


if __name__ == "__main__":
    main()
