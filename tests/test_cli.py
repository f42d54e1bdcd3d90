"""The command line: subcommands, data-summary outputs read back, one-line user errors."""

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from alchemist_jax import cli


def test_help_lists_subcommands():
    result = subprocess.run(
        [sys.executable, "-m", "alchemist_jax.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for command in ("fetch", "data-summary", "prepare"):
        assert command in result.stdout


def test_data_summary_on_corrupted_pool(tmp_path, capsys):
    out = tmp_path / "run"
    status = cli.main(
        [
            "data-summary",
            "--config",
            "configs/demo.yaml",
            "--out",
            str(out),
            "data.pool.train_size=200",
            "data.corrupt.fraction=0.3",
        ]
    )
    assert status == 0
    stats = json.loads((out / "summary.json").read_text())
    assert stats["count"] == stats["examined"] == 200
    assert stats["image_shapes"] == {"28x28x1": 200}
    assert stats["origins"] == {"animals": 100, "mnist": 100}
    assert sum(stats["labels"].values()) == 200 and len(stats["labels"]) == 20
    assert stats["defects"]["clean"] == 140 and sum(stats["defects"].values()) == 200
    assert 3 <= stats["caption_words"]["min"] <= stats["caption_words"]["max"] <= 9
    truth = pq.read_table(out / "defects.parquet")
    assert truth.num_rows == 200 and truth.column("defect").null_count == 140
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[0] > 800 and sheet.size[1] > 800
    assert np.asarray(sheet.convert("L")).std() > 20  # not blank: images and text were drawn
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["data-summary", "--out", "X", "data.batch_sise=3"],
            "unknown config key 'data.batch_sise'",
        ),
        (
            ["data-summary", "--out", "X", "data.source=/no/such/manifest.csv"],
            "'/no/such/manifest.csv' is neither a built-in",
        ),
        (["data-summary", "--out", "X", "data.split=valid"], "unknown split 'valid'"),
    ],
)
def test_user_errors_are_one_line(tmp_path, capsys, argv, message):
    argv = [str(tmp_path / a) if a == "X" else a for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_prepare_then_load_round_trip(tmp_path, capsys):
    from alchemist_jax import data
    from alchemist_jax.config import DataConfig, PoolConfig

    out = tmp_path / "tfds"
    assert (
        cli.main(
            [
                "prepare",
                "--source",
                "pool",
                "--splits",
                "train,test",
                "--out",
                str(out),
                "data.pool.train_size=60",
                "data.pool.test_size=20",
            ]
        )
        == 0
    )
    assert "wrote TFDS dataset" in capsys.readouterr().out
    config = DataConfig(pool=PoolConfig(train_size=60, test_size=20))
    for split, size in (("train", 60), ("test", 20)):
        original, prepared = data.load("pool", split, config=config), data.load(out, split)
        assert len(prepared) == size and np.array_equal(prepared.ids, original.ids)
        for i in range(size):
            a, b = original[i], prepared[i]
            assert set(a) == set(b)
            assert a["id"] == b["id"] and a["caption"] == b["caption"]
            assert a["label"] == b["label"] and a["source"] == b["source"]
            assert np.array_equal(a["image"], b["image"]) and b["image"].dtype == np.uint8
    # A second run refuses to overwrite, with one line.
    assert cli.main(["prepare", "--source", "pool", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_overrides_may_follow_the_options(capsys):
    argv = ["select", "--config", "configs/demo.yaml", "select.seed=1", "--ratings", "r.parquet"]
    args = cli._parse(cli.build_parser(), [*argv, "--out", "s.parquet", "select.keep=0.25"])
    assert args.overrides == ["select.seed=1", "select.keep=0.25"]
    assert args.out.name == "s.parquet"
    for stray in (["--bogus"], ["stray"]):
        with pytest.raises(SystemExit) as exit_info:
            cli._parse(cli.build_parser(), [*argv, "--out", "s.parquet", *stray])
        assert exit_info.value.code == 2
        assert f"unrecognized arguments: {stray[0]}" in capsys.readouterr().err
