"""Helper for test_multiprocess.py: `rate`, `score` (with the rater just learned) and `train`
(weighted by those scores) through the CLI, in one process of a (possibly) multi-process run.

Run as `python tests/multiprocess_run.py DEVICES WORKDIR [alchemist-jax global flags]`: DEVICES
fake CPU devices in this process (set before jax loads); WORKDIR receives rate/, ratings.parquet
and train/, and <command>-ids-<process>.json, the ids of the examples each command read in this
process. The flags (--coordinator, --process-count, --process-id) go to every command, as a user
would give them.
"""

import os
import sys

devices, workdir = int(sys.argv[1]), sys.argv[2]
flags = sys.argv[3:]
# XLA's CPU backend without its expensive passes (see mesh_programs.py): every process of the
# comparison compiles the same way.
os.environ["XLA_FLAGS"] = (
    f"--xla_force_host_platform_device_count={devices}"
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402

import jax  # noqa: E402

from alchemist_jax import cli  # noqa: E402
from alchemist_jax.data import pipeline  # noqa: E402
from alchemist_jax.scoring import driver  # noqa: E402

# Records the ids of every batch this process reads, to show what it read.
read_ids: list[int] = []
next_batch = pipeline.GlobalBatches.__next__


def recording_next(self):
    batch = next_batch(self)
    read_ids.extend(int(i) for i in batch["id"])
    return batch


pipeline.GlobalBatches.__next__ = recording_next
pool_columns = driver.pool_columns


def recording_columns(source, start, stop):
    columns = pool_columns(source, start, stop)
    read_ids.extend(int(i) for i in columns["id"])
    return columns


driver.pool_columns = recording_columns

sys.path.insert(0, os.path.dirname(__file__))
from test_rate import TINY  # noqa: E402

# 4 devices in all: the batch rows over data (across processes when there are two), the
# proxies over population (inside each process).
OVERRIDES = [
    *TINY,
    "mesh.data=2",
    "mesh.population=2",
    "score.batch_size=16",
    "score.chunk_size=32",
    "train.batch_size=8",
    "train.steps=4",
    "train.warmup_steps=2",
    "train.checkpoint_every=2",
    "train.eval_every=4",
]
for command in (
    ["rate", "--workdir", f"{workdir}/rate"],
    [
        "score",
        "--out",
        f"{workdir}/ratings.parquet",
        "--rater",
        f"{workdir}/rate",
        "--scorer",
        "rater",
    ],
    ["train", "--workdir", f"{workdir}/train", "--weights", f"{workdir}/ratings.parquet"],
):
    status = cli.main([*flags, *command, "--config", "configs/demo.yaml", *OVERRIDES])
    if status:
        sys.exit(f"alchemist-jax {command[0]} exited with {status}")
    with open(f"{workdir}/{command[0]}-ids-{jax.process_index()}.json", "w") as f:
        json.dump(read_ids, f)
    read_ids.clear()
