"""prepare_tfds / TfdsSource round trips (TFDS array_record, no TensorFlow)."""

import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import registered

from alchemist_jax.data.sources import ArraySource, Source
from alchemist_jax.data.tfds_dataset import TfdsSource, find_tfds_dir, is_tfds_dir, prepare_tfds


def _array_source(name, n, first_id, seed):
    rng = np.random.default_rng(seed)
    ids = first_id + 3 * np.arange(n)
    return ArraySource(
        name,
        ids=ids,
        images=rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8),
        captions=[f"a drawing number {i} — é" for i in ids],
        labels=rng.integers(0, 10, n),
        origins=[name] * n,
    )


def _assert_same(expected: Source, got: Source):
    assert len(got) == len(expected)
    for i in range(len(expected)):
        want, have = expected[i], got[i]
        assert set(have) == set(want)
        for key, value in want.items():
            if isinstance(value, str):
                assert have[key] == value
            else:
                assert np.asarray(have[key]).dtype == np.asarray(value).dtype, key
                np.testing.assert_array_equal(have[key], value, err_msg=key)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    splits = {
        "train": _array_source("toy/train", 12, 1000, 0),
        "validation": _array_source("toy/validation", 5, 5000, 1),
    }
    out = tmp_path_factory.mktemp("tfds")
    return splits, out, prepare_tfds(splits, out, name="toy")


def test_round_trip(prepared):
    splits, out, path = prepared
    assert path == out / "toy" / "1.0.0"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # temp folder removed
    for split, source in splits.items():
        loaded = TfdsSource(path, split)
        assert loaded.name == f"toy/{split}"
        _assert_same(source, loaded)
        np.testing.assert_array_equal(loaded.ids, source.ids)
        np.testing.assert_array_equal(loaded.labels, source.labels)
        assert loaded.ids.dtype == loaded.labels.dtype == np.int64
        assert isinstance(loaded[0]["id"], np.int64)
    assert _feature_shape(path, "image") == (8, 8, 1)


def _feature_shape(path, key):
    return tfds.builder_from_directory(str(path)).info.features[key].shape


def test_ids_without_sidecar_read_records(prepared):
    splits, _, path = prepared
    (path / "alchemist_ids_train.npy").rename(path / "ids.bak")
    (path / "alchemist_labels_train.npy").rename(path / "labels.bak")
    try:
        loaded = TfdsSource(path, "train")
        np.testing.assert_array_equal(loaded.ids, splits["train"].ids)
        np.testing.assert_array_equal(loaded.labels, splits["train"].labels)
    finally:
        (path / "ids.bak").rename(path / "alchemist_ids_train.npy")
        (path / "labels.bak").rename(path / "alchemist_labels_train.npy")


def test_path_resolution(prepared):
    _, out, path = prepared
    assert is_tfds_dir(path) and is_tfds_dir(out) and is_tfds_dir(out / "toy")
    assert find_tfds_dir(out) == find_tfds_dir(out / "toy") == path
    assert len(TfdsSource(out, "validation")) == 5
    assert not is_tfds_dir(path / "features.json") and not is_tfds_dir(out / "missing")


def test_pickles(prepared):
    _, _, path = prepared
    source = TfdsSource(path, "train")
    copy = pickle.loads(pickle.dumps(source))
    assert copy[3]["id"] == source[3]["id"] == 1009


def test_errors(prepared, tmp_path):
    splits, out, path = prepared
    with pytest.raises(ValueError, match=r"split 'tset'.*available: train, validation"):
        TfdsSource(path, "tset")
    with pytest.raises(ValueError, match="is not a TFDS dataset directory"):
        TfdsSource(tmp_path, "train")
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        prepare_tfds(splits, out, name="toy")
    with pytest.raises(ValueError, match="snake_case"):
        prepare_tfds(splits, tmp_path, name="Bad-Name")
    with pytest.raises(ValueError, match=r"\['test'\] are empty"):
        prepare_tfds({**splits, "test": splits["train"].take(np.arange(0))}, tmp_path)


def test_overwrite_and_several_datasets(tmp_path):
    first = {"train": _array_source("a", 4, 0, 0)}
    prepare_tfds(first, tmp_path, name="ds")
    second = {"train": _array_source("b", 6, 100, 1)}
    path = prepare_tfds(second, tmp_path, name="ds", overwrite=True)
    _assert_same(second["train"], TfdsSource(path, "train"))
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]

    prepare_tfds(first, tmp_path, name="other")
    assert is_tfds_dir(tmp_path)
    with pytest.raises(ValueError, match="several TFDS datasets"):
        TfdsSource(tmp_path, "train")


def test_precomputed_round_trip(tmp_path):
    n = 7
    rng = np.random.default_rng(2)
    source = ArraySource(
        "pre",
        ids=10 + np.arange(n),
        images=None,
        captions=[f"c{i}" for i in range(n)],
        extra={
            "latent": rng.normal(size=(n, 4, 4, 2)).astype(np.float32),
            "text_embedding": rng.normal(size=(n, 6)).astype(np.float32),
        },
    )
    path = prepare_tfds({"train": source}, tmp_path, name="pre")
    loaded = TfdsSource(path, "train")
    _assert_same(source, loaded)
    assert loaded[0]["latent"].shape == (4, 4, 2) and loaded.labels is None
    assert _feature_shape(path, "latent") == (4, 4, 2)
    assert _feature_shape(path, "text_embedding") == (6,)


class _VariableImages(Source):
    """Images of different sizes, 3 channels, no label."""

    name = "variable"

    def __len__(self):
        return 4

    def __getitem__(self, index):
        index = self._check_index(index)
        image = np.full((5 + index, 9 - index, 3), index, dtype=np.uint8)
        return {"id": np.int64(70 + index), "image": image, "caption": f"size {index}"}


def test_variable_image_shapes(tmp_path):
    source = _VariableImages()
    path = prepare_tfds({"test": source}, tmp_path)
    assert path == tmp_path / "alchemist_dataset" / "1.0.0"
    loaded = TfdsSource(path, "test")
    _assert_same(source, loaded)
    assert loaded[2]["image"].shape == (7, 7, 3)
    assert _feature_shape(path, "image") == (None, None, 3)


def test_inconsistent_keys_fail_and_leave_nothing(tmp_path):
    class Ragged(_VariableImages):
        def __getitem__(self, index):
            example = super().__getitem__(index)
            if index == 2:
                del example["caption"]
            return example

    with pytest.raises(ValueError, match="example 2 of split 'train'"):
        prepare_tfds({"train": Ragged()}, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_foreign_dataset(tmp_path):
    """A TFDS dataset not written by prepare_tfds: no id, 2-D images, a ClassLabel, no sidecars."""
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)

    with registered.skip_registration():

        class Foreign(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("0.1.0")
            code_path = None

            def _info(self):
                return tfds.core.DatasetInfo(
                    builder=self,
                    disable_shuffling=True,
                    features=tfds.features.FeaturesDict(
                        {
                            "image": tfds.features.Tensor(shape=(4, 5), dtype=np.uint8),
                            "label": tfds.features.ClassLabel(num_classes=3),
                            "file_name": tfds.features.Text(),
                        }
                    ),
                )

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                for i in range(3):
                    yield i, {"image": images[i], "label": 2 - i, "file_name": f"f{i}.png"}

    builder = Foreign(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare(download_dir=str(tmp_path / "downloads"))
    source = TfdsSource(tmp_path / "foreign", "train")
    np.testing.assert_array_equal(source.ids, [0, 1, 2])
    np.testing.assert_array_equal(source.labels, [2, 1, 0])
    example = source[1]
    assert example["id"] == 1 and isinstance(example["id"], np.int64)
    assert example["file_name"] == "f1.png"
    assert example["image"].shape == (4, 5, 1) and example["image"].dtype == np.uint8
    np.testing.assert_array_equal(example["image"][..., 0], images[1])
