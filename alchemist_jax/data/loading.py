"""Opening a source of examples by built-in name or by path (`load`)."""

from __future__ import annotations

from pathlib import Path

from alchemist_jax.config import DataConfig
from alchemist_jax.data import builtin
from alchemist_jax.data.shapes import ShapesSource
from alchemist_jax.data.sources import Source

BUILTIN_SOURCES = ("mnist", "animals", "shapes", "pool")
MANIFEST_SUFFIXES = (".parquet", ".csv")


def load(
    name_or_path: str | Path,
    split: str = "train",
    *,
    config: DataConfig = DataConfig(),
    report_dir: str | Path | None = None,
) -> Source:
    """Opens a source of examples by built-in name or by path.

    Args:
      name_or_path: `mnist`, `animals`, `shapes`, `pool`; a `.parquet` / `.csv` manifest; a TFDS
        array_record dataset directory; or a folder of images with sidecar `.txt` captions.
      split: `train`, `validation` or `test` for built-ins; a split name of a TFDS dataset;
        ignored by manifests and image folders, which hold one split each.
      config: sizes of `pool` / `shapes` and the manifest columns and bad-sample policy.
      report_dir: where user-data loading writes `bad_samples.parquet` (None: not written).
    Raises:
      ValueError (one line) for an unknown name, a missing path or an unknown split.
    """
    name = str(name_or_path)
    if name in ("mnist", "animals"):
        return getattr(builtin, name)(split)
    if name == "pool":
        return builtin.pool(split, config.pool)
    if name == "shapes":
        return ShapesSource(split, config.shapes)
    path = Path(name).expanduser()
    if not path.exists():
        raise ValueError(
            f"data source {name!r} is neither a built-in "
            f"({', '.join(BUILTIN_SOURCES)}) nor an existing path"
        )
    if path.is_file():
        from alchemist_jax.data.manifest import ManifestSource

        return ManifestSource(path, config.manifest, report_dir=report_dir)
    from alchemist_jax.data.tfds_dataset import TfdsSource, is_tfds_dir

    if is_tfds_dir(path):
        return TfdsSource(path, split)
    from alchemist_jax.data.manifest import ImageFolderSource

    return ImageFolderSource(path, config.manifest, report_dir=report_dir)
