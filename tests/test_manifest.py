"""User data ingestion: manifests (CSV, Parquet), image folders, bad samples, precomputed arrays."""

import dataclasses
import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

from alchemist_jax.config import ManifestConfig
from alchemist_jax.data import manifest
from alchemist_jax.data.manifest import (
    BAD_SAMPLES_SCHEMA,
    BadSampleError,
    ImageFolderSource,
    ManifestError,
    ManifestSource,
)

# Every good image has at most 100 pixels; big.png has 400.
CONFIG = ManifestConfig(
    image_column="file", caption_column="text", id_column="key", max_image_pixels=100
)


# ----------------------------------------------------------------------------------------------
# Test data
# ----------------------------------------------------------------------------------------------


def png_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format)
    return buffer.getvalue()


def rgba_image() -> Image.Image:
    pixels = np.array(
        [[[10, 20, 30, 0], [255, 0, 0, 255]], [[0, 0, 0, 128], [0, 0, 255, 255]]], dtype=np.uint8
    )
    return Image.fromarray(pixels, "RGBA")


def deep_image() -> Image.Image:
    return Image.fromarray(np.array([[65535, 256], [255, 0]], dtype=np.uint16))


def palette_image() -> Image.Image:
    image = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), "P")
    image.putpalette([0, 0, 0, 0, 255, 0])
    return image


def truncated_png() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    data = png_bytes(Image.fromarray(noise))
    return data[: len(data) // 2]


def write_images(folder: Path) -> None:
    """Good images of several modes and one file of each bad kind (missing.png is absent)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "gray.png": png_bytes(Image.new("L", (4, 3), 77)),
        "rgb.jpg": png_bytes(Image.new("RGB", (4, 4), (200, 100, 50)), "JPEG"),
        "rgba.png": png_bytes(rgba_image()),
        "deep.png": png_bytes(deep_image()),
        "palette.png": png_bytes(palette_image()),
        "empty.png": b"",
        "text.png": b"this is not an image\n",
        "truncated.png": truncated_png(),
        "big.png": png_bytes(Image.new("RGB", (20, 20), (1, 2, 3))),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)


# (key, image path, caption bytes); rows 5-12 are bad, 13 uses an absolute path.
ROWS = [
    (10, "img/gray.png", b"a gray square"),
    (11, "img/rgb.jpg", b"an orange square"),
    (12, "img/rgba.png", b"  half transparent \n"),
    (13, "img/deep.png", b"sixteen bits"),
    (14, "img/palette.png", "caf\u00e9 palette".encode()),
    (15, "img/missing.png", b"missing"),
    (16, "img/empty.png", b"empty"),
    (17, "img/text.png", b"text"),
    (18, "img/truncated.png", b"truncated"),
    (19, "img/big.png", b"too large"),
    (20, "img/gray.png", b"   "),
    (21, "img/gray.png", b"caf\xe9 latin-1"),
    (10, "img/rgb.jpg", b"same key as row 0"),
    (22, None, b"absolute path"),  # the image path is filled in by write_manifest
]
EXPECTED_BAD = [
    (5, "img/missing.png", "missing file"),
    (6, "img/empty.png", "empty file"),
    (7, "img/text.png", "unreadable or not an image"),
    (8, "img/truncated.png", "truncated image"),
    (9, "img/big.png", "image too large"),
    (10, "img/gray.png", "empty caption"),
    (11, "img/gray.png", "non-UTF-8 caption"),
    (12, "img/rgb.jpg", "duplicate id"),
]
EXPECTED_IDS = [10, 11, 12, 13, 14, 22]


def csv_field(value: bytes) -> bytes:
    return b'"' + value.replace(b'"', b'""') + b'"'


def write_csv(path: Path, columns: dict[str, list]) -> None:
    """Writes columns of bytes/str/int values (None: empty field) as a CSV file of raw bytes."""

    def encode(value):
        if value is None:
            return b""
        return csv_field(value if isinstance(value, bytes) else str(value).encode())

    lines = [b",".join(csv_field(name.encode()) for name in columns)]
    lines += [b",".join(encode(v) for v in row) for row in zip(*columns.values())]
    path.write_bytes(b"\n".join(lines) + b"\n")


def write_table(path: Path, columns: dict[str, list]) -> None:
    """Writes columns as CSV or Parquet depending on the suffix (bytes columns stay binary)."""
    if path.suffix == ".csv":
        write_csv(path, columns)
    else:
        pq.write_table(pa.table(columns), path)


@pytest.fixture(params=["csv", "parquet"])
def dataset(request, tmp_path) -> Path:
    """A manifest (CSV or Parquet) over the images of `write_images`, with the rows of ROWS."""
    write_images(tmp_path / "data" / "img")
    path = tmp_path / "data" / f"manifest.{request.param}"
    absolute = str(tmp_path / "data" / "img" / "rgb.jpg")
    write_table(
        path,
        {
            "key": [key for key, _, _ in ROWS],
            "file": [image or absolute for _, image, _ in ROWS],
            "text": [caption for _, _, caption in ROWS],
        },
    )
    return path


def single_row_manifest(tmp_path: Path, image: Image.Image | bytes, suffix=".png") -> Path:
    folder = tmp_path / "one"
    folder.mkdir()
    data = (
        image
        if isinstance(image, bytes)
        else png_bytes(image, {".png": "PNG", ".tif": "TIFF", ".jpg": "JPEG"}[suffix])
    )
    (folder / f"image{suffix}").write_bytes(data)
    path = folder / "m.parquet"
    write_table(path, {"image": [f"image{suffix}"], "caption": ["x"]})
    return path


def bad_rows(source) -> list[tuple]:
    return [(r["row"], r["path"], r["reason"]) for r in source.bad_samples.to_pylist()]


# ----------------------------------------------------------------------------------------------
# Manifests
# ----------------------------------------------------------------------------------------------


def test_manifest_skips_every_kind_of_bad_sample(dataset, tmp_path):
    report_dir = tmp_path / "reports" / "run1"
    source = ManifestSource(dataset, CONFIG, report_dir=report_dir)

    assert len(source) == 6
    assert source.ids.dtype == np.int64
    assert source.ids.tolist() == EXPECTED_IDS
    assert bad_rows(source) == EXPECTED_BAD
    assert set(source.bad_samples.column("file").to_pylist()) == {str(dataset)}
    report = pq.read_table(report_dir / "bad_samples.parquet")
    assert report.schema == BAD_SAMPLES_SCHEMA
    assert report.to_pylist() == [
        {"file": str(dataset), "row": row, "path": path, "reason": reason}
        for row, path, reason in EXPECTED_BAD
    ]
    assert sorted(p.name for p in report_dir.iterdir()) == ["bad_samples.parquet"]


def test_manifest_examples_hold_rgb_pixels_and_stripped_captions(dataset):
    source = ManifestSource(dataset, CONFIG)
    examples = [source[i] for i in range(len(source))]

    assert [type(e["id"]) for e in examples] == [np.int64] * 6
    assert [e["caption"] for e in examples] == [
        "a gray square",
        "an orange square",
        "half transparent",
        "sixteen bits",
        "caf\u00e9 palette",
        "absolute path",
    ]
    assert [e["source"] for e in examples[:5]] == [
        "img/gray.png",
        "img/rgb.jpg",
        "img/rgba.png",
        "img/deep.png",
        "img/palette.png",
    ]
    for e in examples:
        assert e["image"].dtype == np.uint8 and e["image"].ndim == 3 and e["image"].shape[2] == 3
    gray, rgb, rgba, deep, palette, absolute = (e["image"] for e in examples)
    assert gray.shape == (3, 4, 3) and (gray == 77).all()
    assert np.abs(rgb.astype(int) - [200, 100, 50]).max() <= 3  # JPEG is lossy
    assert rgba[0, 0].tolist() == [255, 255, 255]  # alpha 0 -> white
    assert rgba[0, 1].tolist() == [255, 0, 0]
    assert np.abs(rgba[1, 0].astype(int) - 127).max() <= 1  # black at alpha 128 over white
    assert rgba[1, 1].tolist() == [0, 0, 255]
    assert deep[..., 0].tolist() == [[255, 1], [0, 0]] and (deep == deep[..., :1]).all()
    assert palette[0, 0].tolist() == [0, 0, 0] and palette[0, 1].tolist() == [0, 255, 0]
    np.testing.assert_array_equal(absolute, rgb)


def test_skip_logs_one_line_per_bad_sample_and_a_summary(dataset, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="alchemist_jax.data")
    ManifestSource(dataset, CONFIG, report_dir=tmp_path / "reports")

    lines = [r.getMessage() for r in caplog.records if r.name == "alchemist_jax.data"]
    assert lines == [
        f"{dataset}: row {row}: {path}: {reason} (skipped)" for row, path, reason in EXPECTED_BAD
    ] + [
        f"{dataset}: 8 bad samples skipped of 14; "
        f"see {tmp_path / 'reports' / 'bad_samples.parquet'}"
    ]
    assert all(
        r.levelno == logging.WARNING for r in caplog.records if r.name == "alchemist_jax.data"
    )


def test_error_mode_raises_at_the_first_bad_sample(dataset, tmp_path):
    with pytest.raises(BadSampleError) as raised:
        ManifestSource(
            dataset,
            dataclasses.replace(CONFIG, on_bad_sample="error"),
            report_dir=tmp_path / "reports",
        )
    assert str(raised.value) == f"{dataset}: row 5: img/missing.png: missing file"
    assert isinstance(raised.value, ValueError)
    assert not (tmp_path / "reports" / "bad_samples.parquet").exists()


@pytest.mark.parametrize(
    "image, caption, key, reason",
    [
        ("img/missing.png", b"x", 2, "missing file"),
        ("img/empty.png", b"x", 2, "empty file"),
        ("img/text.png", b"x", 2, "unreadable or not an image"),
        ("img/truncated.png", b"x", 2, "truncated image"),
        ("img/big.png", b"x", 2, "image too large"),
        ("img/gray.png", b" \t\n", 2, "empty caption"),
        ("img/gray.png", b"\xff\xfe", 2, "non-UTF-8 caption"),
        ("img/gray.png", b"x", 1, "duplicate id"),
        ("img/gray.png", b"x", None, "null id"),
        (None, b"x", 2, "null image path"),
        ("img/gray.png", None, 2, "null caption"),
    ],
)
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_each_bad_kind_is_skipped_or_raised_with_file_row_path_and_reason(
    tmp_path, suffix, image, caption, key, reason
):
    if suffix == ".csv" and caption is None:
        reason = "empty caption"  # an empty CSV field is an empty string, not a null
    write_images(tmp_path / "img")
    path = tmp_path / f"m{suffix}"
    write_table(
        path, {"file": ["img/gray.png", image], "text": [b"good", caption], "key": [1, key]}
    )
    assert bad_rows(ManifestSource(path, CONFIG)) == [(1, image, reason)]
    with pytest.raises(BadSampleError) as raised:
        ManifestSource(path, dataclasses.replace(CONFIG, on_bad_sample="error"))
    where = f"{path}: row 1: " + ("" if image is None else f"{image}: ")
    assert str(raised.value) == where + reason


@pytest.mark.parametrize(
    "image, expected",
    [
        (Image.new("L", (2, 1), 77), [[77, 77, 77]] * 2),
        (Image.new("1", (2, 1), 1), [[255, 255, 255]] * 2),
        (Image.new("LA", (2, 1), (77, 0)), [[255, 255, 255]] * 2),
        (Image.new("LA", (2, 1), (77, 255)), [[77, 77, 77]] * 2),
        (Image.new("RGB", (2, 1), (1, 2, 3)), [[1, 2, 3]] * 2),
        (Image.new("RGBA", (2, 1), (1, 2, 3, 0)), [[255, 255, 255]] * 2),
        (Image.new("RGBA", (2, 1), (1, 2, 3, 255)), [[1, 2, 3]] * 2),
        (Image.new("I;16", (2, 1), 65535), [[255, 255, 255]] * 2),
        (Image.new("I;16", (2, 1), 0x1234), [[0x12, 0x12, 0x12]] * 2),
    ],
)
def test_png_modes_become_rgb(tmp_path, image, expected):
    source = ManifestSource(single_row_manifest(tmp_path, image))
    assert source[0]["image"][0].tolist() == expected


def test_palette_transparency_is_composited_onto_white(tmp_path):
    image = palette_image()
    image.info["transparency"] = 0  # palette entry 0 (black) is transparent
    pixels = ManifestSource(single_row_manifest(tmp_path, image))[0]["image"]
    assert pixels[:, :, 1].tolist() == [[255, 255], [255, 255]]
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[0, 1].tolist() == [0, 255, 0]


@pytest.mark.parametrize(
    "mode, value, expected",
    [
        ("I;16B", 0xABCD, 0xAB),
        ("I", 65535, 255),
        ("I", 70000, 255),
        ("I", -5, 0),
    ],
)
def test_tiff_integer_modes_are_scaled_from_16_bits(tmp_path, mode, value, expected):
    image = Image.new(mode, (2, 1), value)
    pixels = ManifestSource(single_row_manifest(tmp_path, image, ".tif"))[0]["image"]
    assert pixels.tolist() == [[[expected] * 3] * 2]


def test_cmyk_becomes_rgb(tmp_path):
    image = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # red
    pixels = ManifestSource(single_row_manifest(tmp_path, image, ".tif"))[0]["image"]
    assert pixels.shape == (4, 4, 3) and pixels[0, 0].tolist() == [255, 0, 0]


def test_truncated_images_are_bad_even_if_pil_is_told_to_load_them(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    source = ManifestSource(single_row_manifest(tmp_path, truncated_png()))
    assert bad_rows(source) == [(0, "image.png", "truncated image")]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_pil_decompression_bomb_is_too_large(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # PIL raises above twice this
    source = ManifestSource(single_row_manifest(tmp_path, Image.new("RGB", (20, 20))))
    assert bad_rows(source) == [(0, "image.png", "image too large")]


def test_zero_size_image_is_bad(tmp_path, monkeypatch):
    path = single_row_manifest(tmp_path, Image.new("RGB", (2, 2)))
    monkeypatch.setattr(Image, "open", lambda _: Image.new("RGB", (0, 2)))  # files can't hold it
    assert bad_rows(ManifestSource(path)) == [(0, "image.png", "zero-size image")]


def test_ids_default_to_the_row_index(tmp_path):
    write_images(tmp_path / "img")
    path = tmp_path / "m.csv"
    write_table(
        path,
        {"image": ["img/gray.png", "img/empty.png", "img/rgb.jpg"], "caption": ["a", "b", "c"]},
    )
    source = ManifestSource(path)
    assert source.ids.tolist() == [0, 2]
    assert [source[i]["id"] for i in range(2)] == [0, 2]


def test_report_is_written_when_there_are_no_bad_samples(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="alchemist_jax.data")
    write_images(tmp_path / "img")
    path = tmp_path / "m.parquet"
    write_table(path, {"image": ["img/gray.png", "img/rgb.jpg"], "caption": ["a", "b"]})
    ManifestSource(path, report_dir=tmp_path / "r")
    report = pq.read_table(tmp_path / "r" / "bad_samples.parquet")
    assert report.schema == BAD_SAMPLES_SCHEMA and report.num_rows == 0
    assert [r.getMessage() for r in caplog.records if r.name == "alchemist_jax.data"] == [
        f"{path}: 0 bad samples skipped of 2; see {tmp_path / 'r' / 'bad_samples.parquet'}"
    ]


def test_a_changed_file_raises_bad_sample_error_when_read(tmp_path):
    path = single_row_manifest(tmp_path, Image.new("RGB", (2, 2)))
    source = ManifestSource(path)
    (path.parent / "image.png").write_bytes(b"")
    with pytest.raises(BadSampleError, match="row 0: image.png: empty file"):
        source[0]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
@pytest.mark.parametrize(
    "missing, config_key",
    [("file", "image_column"), ("text", "caption_column"), ("key", "id_column")],
)
def test_a_missing_column_raises_manifest_error(tmp_path, suffix, missing, config_key):
    path = tmp_path / f"m{suffix}"
    columns = {"file": ["a.png"], "text": ["x"], "key": [0]}
    del columns[missing]
    write_table(path, columns)
    with pytest.raises(ManifestError) as raised:
        ManifestSource(path, CONFIG)
    message = str(raised.value)
    assert "\n" not in message
    assert f"column {missing!r} (data.manifest.{config_key}) not found" in message
    assert str(path) in message and f"columns are: {', '.join(columns)}" in message


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("absent.csv", None, "manifest file not found"),
        ("garbage.parquet", b"not parquet at all", "cannot read Parquet manifest"),
        ("ragged.csv", b"file,text,key\na.png,x,0\nb.png\n", "cannot read CSV manifest"),
        ("letters.csv", b"file,text,key\na.png,x,zero\n", "cannot read CSV manifest"),
        ("m.json", b"{}", "unsupported manifest type '.json'"),
    ],
)
def test_an_unusable_manifest_raises_manifest_error(tmp_path, name, content, expected):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ManifestError) as raised:
        ManifestSource(path, CONFIG)
    assert str(raised.value).startswith(f"{path}: {expected}")
    assert "\n" not in str(raised.value)


def test_a_non_integer_id_column_raises_manifest_error(tmp_path):
    path = tmp_path / "m.parquet"
    write_table(path, {"file": ["a.png"], "text": ["x"], "key": ["zero"]})
    with pytest.raises(ManifestError, match="column 'key' must hold integers, got string"):
        ManifestSource(path, CONFIG)


# ----------------------------------------------------------------------------------------------
# Precomputed latents and text embeddings
# ----------------------------------------------------------------------------------------------


def write_precomputed(path: Path, columns: dict, arrays: dict[str, list], shapes: dict) -> None:
    """Writes flattened arrays as list<float32> columns with their shapes in the metadata."""
    table = pa.table(
        {
            **columns,
            **{
                name: pa.array(
                    [None if a is None else np.ravel(a) for a in values], pa.list_(pa.float32())
                )
                for name, values in arrays.items()
            },
        }
    )
    metadata = {manifest.SHAPES_METADATA_KEY: json.dumps(shapes).encode()} if shapes else None
    pq.write_table(table.replace_schema_metadata(metadata), path)


def test_precomputed_latents_and_embeddings_round_trip_without_images_or_captions(tmp_path):
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(3, 4, 2, 2)).astype(np.float32)
    embeddings = rng.normal(size=(3, 3, 5)).astype(np.float32)
    path = tmp_path / "pre.parquet"
    write_precomputed(
        path,
        {"id": [7, 8, 9]},
        {"latent": list(latents), "text_embedding": list(embeddings)},
        {"latent": [4, 2, 2], "text_embedding": [3, 5]},
    )
    source = ManifestSource(path, ManifestConfig(id_column="id"))

    assert source.ids.tolist() == [7, 8, 9]
    for i in range(3):
        example = source[i]
        assert set(example) == {"id", "latent", "text_embedding"}
        assert example["latent"].dtype == np.float32 and example["latent"].shape == (4, 2, 2)
        np.testing.assert_array_equal(example["latent"], latents[i])
        np.testing.assert_array_equal(example["text_embedding"], embeddings[i])


def test_precomputed_latents_next_to_images_and_bad_latent_rows(tmp_path):
    write_images(tmp_path / "img")
    path = tmp_path / "pre.parquet"
    write_precomputed(
        path,
        {"image": ["img/gray.png"] * 3, "caption": ["a", "b", "c"]},
        {
            "latent": [np.arange(4.0), None, np.arange(3.0)],
            "text_embedding": [np.ones(6), np.ones(6), np.ones(6)],
        },
        {"latent": [2, 2]},
    )  # text_embedding has no shape: 1-D
    source = ManifestSource(path)

    assert bad_rows(source) == [
        (1, "img/gray.png", "null latent"),
        (2, "img/gray.png", "latent size does not match its shape"),
    ]
    example = source[0]
    assert set(example) == {"id", "image", "caption", "source", "latent", "text_embedding"}
    assert example["latent"].tolist() == [[0, 1], [2, 3]]
    assert example["text_embedding"].shape == (6,)


def test_images_are_required_without_latents(tmp_path):
    path = tmp_path / "pre.parquet"
    write_precomputed(path, {"caption": ["a"]}, {"text_embedding": [np.ones(3)]}, {})
    with pytest.raises(ManifestError, match="column 'image' .* not found"):
        ManifestSource(path)


def test_precomputed_columns_must_hold_float_lists(tmp_path):
    path = tmp_path / "pre.parquet"
    write_table(path, {"caption": ["a"], "latent": ["not a list"]})
    with pytest.raises(ManifestError, match="column 'latent' must hold list<float>"):
        ManifestSource(path)


# ----------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------


CAPTIONS = {  # sidecar text of each image (None: no sidecar)
    "a_gray.png": b"gray\n",
    "b_rgba.png": b"\xef\xbb\xbfwith a byte-order mark ",
    "c_deep.png": b"deep",
    "d_empty.png": b"empty",
    "e_text.png": b"text",
    "f_truncated.png": b"truncated",
    "g_big.png": b"big",
    "h_uncaptioned.png": None,
    "i_blank.png": b" \n",
    "j_latin1.png": b"caf\xe9",
    "sub/k_palette.png": b"palette",
}
FOLDER_BAD = [
    (3, "d_empty.png", "empty file"),
    (4, "e_text.png", "unreadable or not an image"),
    (5, "f_truncated.png", "truncated image"),
    (6, "g_big.png", "image too large"),
    (7, "h_uncaptioned.png", "missing caption file"),
    (8, "i_blank.png", "empty caption"),
    (9, "j_latin1.png", "non-UTF-8 caption"),
]


@pytest.fixture
def image_folder(tmp_path) -> Path:
    write_images(tmp_path / "images")
    contents = {
        "gray.png": "a_gray.png",
        "rgba.png": "b_rgba.png",
        "deep.png": "c_deep.png",
        "empty.png": "d_empty.png",
        "text.png": "e_text.png",
        "truncated.png": "f_truncated.png",
        "big.png": "g_big.png",
        "rgb.jpg": "h_uncaptioned.png",
        "palette.png": "sub/k_palette.png",
    }
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    for original, name in contents.items():
        (folder / name).write_bytes((tmp_path / "images" / original).read_bytes())
    for name in ("i_blank.png", "j_latin1.png"):
        (folder / name).write_bytes((tmp_path / "images" / "gray.png").read_bytes())
    for name, caption in CAPTIONS.items():
        if caption is not None:
            (folder / name).with_suffix(".txt").write_bytes(caption)
    (folder / "notes.md").write_text("not an image, not listed")
    return folder


def test_image_folder_skips_bad_files_and_keeps_listing_ids(image_folder, tmp_path, caplog):
    source = ImageFolderSource(image_folder, CONFIG, report_dir=tmp_path / "r")

    assert source.ids.tolist() == [0, 1, 2, 10]
    assert bad_rows(source) == FOLDER_BAD
    report = pq.read_table(tmp_path / "r" / "bad_samples.parquet").to_pylist()
    assert report == [
        {"file": str(image_folder), "row": row, "path": path, "reason": reason}
        for row, path, reason in FOLDER_BAD
    ]
    warnings = [r.getMessage() for r in caplog.records if "(skipped)" in r.getMessage()]
    assert warnings[0] == f"{image_folder}: row 3: d_empty.png: empty file (skipped)"
    assert len(warnings) == 7


def test_image_folder_examples(image_folder):
    source = ImageFolderSource(image_folder, CONFIG)
    examples = [source[i] for i in range(len(source))]

    assert [e["source"] for e in examples] == [
        "a_gray.png",
        "b_rgba.png",
        "c_deep.png",
        "sub/k_palette.png",
    ]
    assert [e["caption"] for e in examples] == ["gray", "with a byte-order mark", "deep", "palette"]
    assert [e["id"] for e in examples] == [0, 1, 2, 10]
    assert examples[0]["image"][0, 0].tolist() == [77, 77, 77]
    assert examples[1]["image"][0, 0].tolist() == [255, 255, 255]
    assert examples[2]["image"][0, 0].tolist() == [255, 255, 255]
    assert examples[3]["image"][0, 1].tolist() == [0, 255, 0]


def test_image_folder_error_mode(image_folder):
    config = ManifestConfig(on_bad_sample="error", max_image_pixels=100)
    with pytest.raises(BadSampleError) as raised:
        ImageFolderSource(image_folder, config)
    assert str(raised.value) == f"{image_folder}: row 3: d_empty.png: empty file"


def test_image_folder_that_is_missing_or_empty_raises_manifest_error(tmp_path):
    with pytest.raises(ManifestError, match="image folder not found"):
        ImageFolderSource(tmp_path / "absent")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("caption without an image")
    with pytest.raises(ManifestError, match="no image files"):
        ImageFolderSource(tmp_path / "texts")


def test_exif_orientation_is_applied(tmp_path):
    """A photo stored sideways with EXIF orientation 6 (rotate 90° clockwise) comes out upright."""
    stored = np.zeros((2, 3, 3), np.uint8)  # 2 rows x 3 columns as stored in the file
    stored[0, 0] = (255, 0, 0)  # red at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "photo.png", exif=exif)
    (tmp_path / "photo.txt").write_text("a sideways photo")
    image = ImageFolderSource(tmp_path)[0]["image"]
    assert image.shape == (3, 2, 3)  # upright: 3 rows x 2 columns
    assert image[0, 1].tolist() == [255, 0, 0]  # stored top-left ends at the top-right
