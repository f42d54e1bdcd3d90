"""Near-duplicate detection: fingerprints against references, grouping of exact, shifted,
brightened and re-encoded copies, candidate counts, the command's file and its errors."""

import io

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.fft
from flax import nnx
from PIL import Image

from alchemist_jax import cli, dedup, models, scoring
from alchemist_jax import config as config_lib
from alchemist_jax.config import DedupConfig, load_config
from alchemist_jax.data.corrupt import scale_brightness, shift
from alchemist_jax.data.preprocess import to_unit_range
from alchemist_jax.runtime import checkpoints

# A 200-sample pool whose defects are all copies: 20 exact, 20 shifted + brightened.
POOL = [
    "data.pool.train_size=200",
    "data.pool.validation_size=20",
    "data.pool.test_size=20",
    "data.corrupt.fraction=0.2",
    "data.corrupt.kinds=[duplicate,near_duplicate]",
    "data.max_text_length=16",
    "dedup.batch_size=64",
]


def _blob(seed: int, size: int = 28) -> np.ndarray:
    """uint8 (size, size, 1): a random smooth shape (four Gaussian bumps) on black, kept 6 px
    away from the frame, so that shifts of up to 2 px lose nothing."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    image = np.zeros((size, size))
    for cy, cx, spread in zip(
        rng.uniform(10, size - 10, 4), rng.uniform(10, size - 10, 4), rng.uniform(1.5, 3.0, 4)
    ):
        image += np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * spread**2))
    image[:6], image[-6:], image[:, :6], image[:, -6:] = 0, 0, 0, 0
    return np.rint(255 * image / image.max())[..., None].astype(np.uint8)


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0]).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer))[..., None]


def _fingerprint(images_u8: np.ndarray, cfg: DedupConfig = DedupConfig()):
    """(hashes, embeddings, images in [-1, 1]) of uint8 (N, H, W, 1) images."""
    images = to_unit_range(images_u8)
    canonical = dedup.canonicalize(images)
    hashes = dedup.pack_bits(np.asarray(dedup.phash_bits(canonical)))
    embeddings = np.asarray(dedup.pixel_embeddings(canonical, cfg.embedding_size, cfg.blur))
    return hashes, embeddings, images


# ----------------------------------------------------------------------------------------------
# Fingerprints
# ----------------------------------------------------------------------------------------------


def test_phash_of_a_known_image_is_pinned_and_follows_its_definition():
    image = to_unit_range(_blob(0)[None])
    canonical = dedup.canonicalize(image)
    bits = np.asarray(dedup.phash_bits(canonical))[0]
    assert f"{int(dedup.pack_bits(bits[None])[0]):016x}" == "99e6263399cc6633"
    # The definition with scipy's DCT: bits of the 8 x 8 lowest frequencies above their median.
    resized = np.asarray(jax.image.resize(canonical[0], (32, 32), "linear"), np.float64)
    low = scipy.fft.dctn(resized, norm="ortho")[:8, :8].ravel()
    np.testing.assert_array_equal(bits, low > np.median(low))
    assert dedup.pack_bits(np.eye(64, dtype=bool)[[0, 63]]).tolist() == [2**63, 1]
    assert dedup.hamming(np.uint64(0b1011), np.uint64(0b0110)) == 3


def test_canonical_image_ignores_shifts_and_scales_with_brightness():
    image = _blob(1)
    moved = shift(image, 2, -1)  # the background (0) fills in the uncovered border
    canonical = np.asarray(dedup.canonicalize(to_unit_range(np.stack([image, moved]))))
    np.testing.assert_allclose(canonical[0], canonical[1], atol=1e-5)
    # Content about the background level: a gain of 0.5 halves it (up to uint8 rounding).
    darker = np.asarray(dedup.canonicalize(to_unit_range(scale_brightness(image, 0.5)[None])))
    np.testing.assert_allclose(darker[0], 0.5 * canonical[0], atol=2 / 255)
    blank = np.full((1, 28, 28, 1), 77, np.uint8)
    assert not np.any(np.asarray(dedup.canonicalize(to_unit_range(blank))))
    assert not np.any(
        np.asarray(dedup.pixel_embeddings(dedup.canonicalize(to_unit_range(blank)), 14, 1.0))
    )


def test_aligned_cosine_finds_the_shift_and_ignores_flat_images():
    image = _blob(2)
    pairs = np.stack([image, shift(image, -2, 1), image, _blob(3), image, np.full_like(image, 9)])
    gray = dedup.alignment_images(to_unit_range(pairs), 64, 0.0)
    scores = np.asarray(dedup.aligned_cosine(gray[0::2], gray[1::2], 2, 2))
    assert scores[0] == pytest.approx(1.0, abs=1e-6)
    assert scores[1] < 0.95 and scores[2] == 0.0  # another shape; a flat image
    no_search = np.asarray(dedup.aligned_cosine(gray[0:1], gray[1:2], 0, 2))
    assert no_search[0] < 0.9  # without the shift search the copy does not match


# ----------------------------------------------------------------------------------------------
# Grouping
# ----------------------------------------------------------------------------------------------


def test_exact_copies_are_always_grouped():
    originals = np.stack([_blob(seed) for seed in range(6)])
    images_u8 = np.concatenate(
        [originals, originals[[4, 1, 4]], np.full((2, 28, 28, 1), 50, np.uint8)]
    )  # two equal blanks
    hashes, embeddings, images = _fingerprint(images_u8)
    ids = np.array([50, 11, 12, 13, 14, 15, 9, 21, 22, 30, 31])
    exact_of = dedup.exact_duplicates(images)
    np.testing.assert_array_equal(exact_of, [0, 1, 2, 3, 4, 5, 4, 1, 4, 9, 10])
    # Even with a search that can match nothing, exact copies join their original.
    strict = DedupConfig(window=1, min_cosine=1.0, min_aligned_cosine=1.0)
    groups, counts = dedup.find_groups(
        ids, hashes, embeddings, strict, exact_of, images, show_progress=False
    )
    np.testing.assert_array_equal(groups, [50, 11, 12, 13, 9, 15, 9, 11, 9, 30, 31])
    assert counts["exact_pairs"] == 3 and counts["near_pairs"] == 0


def test_shifted_brightened_and_reencoded_copies_are_grouped_distinct_images_are_not():
    originals = [_blob(seed) for seed in range(10, 30)]
    copies = [
        scale_brightness(shift(originals[0], 1, 2), 1.1),
        scale_brightness(shift(originals[1], -2, -2), 0.9),
        shift(originals[2], 0, -1),
        _jpeg(originals[3], 75),
        scale_brightness(shift(_jpeg(originals[4], 90), 2, 0), 0.95),
    ]
    hashes, embeddings, images = _fingerprint(np.stack(originals + copies))
    ids = np.arange(len(images)) + 100
    groups, counts = dedup.find_groups(
        ids,
        hashes,
        embeddings,
        DedupConfig(),
        dedup.exact_duplicates(images),
        images,
        show_progress=False,
    )
    expected = ids.copy()
    expected[20:] = ids[:5]
    np.testing.assert_array_equal(groups, expected)
    assert counts["near_pairs"] == 5 and counts["exact_pairs"] == 0


def test_group_ids_are_connected_components_named_by_their_smallest_id():
    ids = np.array([10, 3, 7, 5, 8, 1])
    groups = dedup.group_ids(ids, np.array([[0, 2], [2, 4], [4, 0], [3, 5]]))
    np.testing.assert_array_equal(groups, [7, 3, 7, 1, 7, 1])
    np.testing.assert_array_equal(dedup.group_ids(ids, np.zeros((0, 2), np.int64)), ids)


def test_candidates_are_a_small_fraction_of_all_pairs_and_hold_the_planted_copies():
    rng = np.random.default_rng(0)
    count, planted, window = 3000, 60, 4
    embeddings = rng.normal(size=(count, 32)).astype(np.float32)
    hashes = rng.integers(0, 2**63, count, dtype=np.int64).astype(np.uint64)
    sources = rng.choice(count - planted, planted, replace=False)
    embeddings[-planted:] = embeddings[sources] + 0.1 * rng.normal(size=(planted, 32))
    flips = np.uint64(1) << rng.integers(0, 64, (planted, 2)).astype(np.uint64)
    hashes[-planted:] = hashes[sources] ^ flips[:, 0] ^ flips[:, 1]
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    keys = np.concatenate(
        [dedup.rotated_hash_keys(hashes, 4), dedup.simhash_keys(embeddings, 4, seed=0)]
    )
    candidates = np.unique(
        np.concatenate(
            [
                np.sort(np.stack([order[:-offset], order[offset:]], 1), axis=1)
                for order in dedup.sort_orders(keys)
                for offset in range(1, window + 1)
            ]
        ),
        axis=0,
    )
    assert len(candidates) <= 8 * window * count
    assert len(candidates) < 0.025 * count * (count - 1) / 2  # 96,000 of 4.5 million
    planted_pairs = {(int(s), count - planted + n) for n, s in enumerate(sources)}
    for block in (64, 32768):  # blocks of the sort orders change nothing
        close, counts = dedup.close_pairs(
            dedup.sort_orders(keys),
            window,
            hashes,
            embeddings,
            max_hamming=4,
            min_cosine=0.9,
            block=block,
        )
        assert counts["compared"] == sum(count - offset for offset in range(1, window + 1)) * 8
        assert set(map(tuple, close.tolist())) == planted_pairs


def test_rotated_keys_lead_with_each_band():
    keys = dedup.rotated_hash_keys(np.array([0x0123456789ABCDEF], np.uint64), 4)
    assert [f"{int(k):016x}" for k in keys[:, 0]] == [
        "0123456789abcdef",
        "456789abcdef0123",
        "89abcdef01234567",
        "cdef0123456789ab",
    ]


def test_pair_metrics_count_true_and_identical_pairs():
    ids = np.array([0, 1, 2, 3, 4, 5, 6])
    truth = pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "defect": ["duplicate", None, "near_duplicate", None, "near_duplicate", None, None],
            "source_id": pa.array([1, None, 1, None, 5, None, None], pa.int64()),
        }
    )
    # {0, 1, 2}: three true pairs; {3, 6}: pictures identical in the source; 4 missed.
    groups = np.array([0, 0, 0, 3, 4, 5, 3])
    exact_of = np.array([1, 1, 2, 3, 4, 5, 3])
    metrics = dedup.pair_metrics(ids, groups, truth, exact_of)
    assert metrics == {
        "recall_duplicate": 1.0,
        "recall_near_duplicate": 0.5,
        "missed_copies": 1,
        "pairs": 4,
        "true_pairs": 3,
        "pair_precision": 0.75,
        "identical_pairs": 1,
        "pair_precision_identical": 1.0,
    }


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


class Recomputed(Exception):
    """Raised in place of fingerprinting the pool again."""


def _recomputed(*args, **kwargs):
    raise Recomputed


def test_run_writes_the_groups_and_reuses_a_complete_file(tmp_path, monkeypatch):
    cfg = load_config("configs/demo.yaml", POOL)
    out = tmp_path / "dedup.parquet"
    summary = dedup.run(cfg, out)
    assert summary["recall_duplicate"] == 1.0 and summary["recall_near_duplicate"] == 1.0
    assert summary["count"] == 200
    table = pq.read_table(out)
    assert [(f.name, str(f.type)) for f in table.schema] == [
        ("id", "int64"),
        ("group", "int64"),
        ("group_size", "int32"),
    ]
    ids, groups = dedup.read_groups(out)
    sizes = table.column("group_size").to_numpy()
    for group in np.unique(groups):
        members = ids[groups == group]
        assert group == members.min() and np.all(sizes[groups == group] == len(members))
    assert summary["grouped"] == int(np.sum(sizes > 1)) and summary["groups"] == len(
        np.unique(groups)
    )
    metadata = scoring.read_metadata(out)
    assert metadata["count"] == "200" and metadata["near_pairs"] == str(summary["near_pairs"])
    assert '"min_aligned_cosine": 0.995' in metadata["config"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dedup.parquet"]  # no temp file left

    stamp = out.stat().st_mtime_ns
    monkeypatch.setattr(dedup, "fingerprints", _recomputed)
    again = dedup.run(load_config("configs/demo.yaml", POOL + ["dedup.batch_size=7"]), out)
    assert again["seconds"] == 0 and out.stat().st_mtime_ns == stamp
    assert {k: again[k] for k in summary if k != "seconds"} == {
        k: summary[k] for k in summary if k != "seconds"
    }
    with pytest.raises(Recomputed):  # another threshold
        dedup.run(load_config("configs/demo.yaml", POOL + ["dedup.min_cosine=0.8"]), out)
    out.write_bytes(b"not parquet")  # a damaged file
    with pytest.raises(Recomputed):
        dedup.run(cfg, out)


def test_cli_prints_one_line_and_names_bad_keys(tmp_path, capsys):
    out = tmp_path / "d.parquet"
    assert cli.main(["dedup", "--config", "configs/demo.yaml", "--out", str(out), *POOL]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dedup: 200 samples, ")
    assert "recall_duplicate 1.000" in lines[0]
    assert cli.main(["dedup", "--out", str(out), "dedup.windw=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'dedup.windw'" in err and "Did you mean 'dedup.window'" in err
    assert len(err.splitlines()) == 1
    assert cli.main(["dedup", "--out", str(out), "dedup.window=0"]) == 2
    assert "config key 'dedup.window' must be >= 1, got 0" in capsys.readouterr().err
    assert cli.main(["dedup", "--out", str(out), "dedup.embedding=rater"]) == 2
    assert "pass --rater-dir DIR" in capsys.readouterr().err
    assert cli.main(["dedup", "--out", str(out), "--rater-dir", str(tmp_path)]) == 2
    assert "--rater-dir is read by dedup.embedding=rater only" in capsys.readouterr().err


def test_rater_embedding_is_the_rating_runs_image_features(tmp_path):
    """A rating run folder holding only the EMA rater (what `restore_rater` reads)."""
    cfg = load_config(
        "configs/demo.yaml", POOL + ["rater.width=16", "rater.hidden=16", "dedup.embedding=rater"]
    )
    config_lib.write_run_config(cfg, tmp_path, ())
    example = {
        "image": np.zeros((1, 28, 28, 1), np.float32),
        "tokens": np.zeros((1, 16), np.int32),
        "token_mask": np.ones((1, 16), bool),
    }
    graphdef, params, rest = models.init_rater(cfg.rater, example, jax.random.key(3), 16)
    manager = checkpoints.manager(tmp_path / "checkpoints")
    checkpoints.save(manager, 2, {"rater_ema": params}, {})
    manager.wait_until_finished()
    run = scoring.open_rating_run(tmp_path, cfg.data)
    features = dedup.rater_image_features(run, {k: v[0] for k, v in example.items()})
    batch = {
        "image": to_unit_range(np.stack([_blob(5), _blob(6)])),
        "tokens": np.zeros((2, 16), np.int32),
        "token_mask": np.ones((2, 16), bool),
    }
    expected = nnx.merge(graphdef, params, rest).features(batch)[:, :16]
    expected = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(features(batch)), expected, rtol=1e-5, atol=1e-6)

    # Exact copies need no embedding; near copies need a trained rater (docs/RESULTS.md).
    summary = dedup.run(cfg, tmp_path / "dedup.parquet", rater_dir=tmp_path)
    assert summary["recall_duplicate"] == 1.0 and summary["pair_precision"] > 0.9
    assert (
        dedup.config_fingerprint(cfg, run)
        == scoring.read_metadata(tmp_path / "dedup.parquet")["config_sha256"]
        != dedup.config_fingerprint(cfg, None)
    )
