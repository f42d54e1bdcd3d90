"""Where the processes of a multi-process run find each other: flags, then environment; one
process when neither is given; one-line errors for incomplete or invalid settings. (Joining
other processes is tested in test_multiprocess.py.)"""

import pytest

from alchemist_jax import cli
from alchemist_jax.runtime import distributed

ENV = (distributed.COORDINATOR_ENV, distributed.PROCESS_COUNT_ENV, distributed.PROCESS_ID_ENV)


@pytest.fixture(autouse=True)
def no_cluster_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def test_without_settings_the_run_is_one_process():
    assert distributed.initialize() is False


@pytest.mark.parametrize(
    "args, env, message",
    [
        (("localhost:1234", None, None), {}, "needs the coordinator address, the process count"),
        ((None, 2, 0), {}, r"--coordinator / JAX_COORDINATOR_ADDRESS"),
        (("localhost:1234", 2, 2), {}, r"--process-id / JAX_PROCESS_ID=2 must be in \[0, 2\)"),
        (
            (None, None, None),
            {"JAX_NUM_PROCESSES": "two"},
            r"JAX_NUM_PROCESSES='two' \(--process-count\)",
        ),
        (
            (None, None, None),
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"},
            "got h:1, None, 0",
        ),
    ],
)
def test_incomplete_or_invalid_settings_fail_with_one_line(monkeypatch, args, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        distributed.initialize(*args)


def test_the_cli_reports_bad_settings_as_a_user_error(capsys):
    status = cli.main(
        [
            "--coordinator",
            "localhost:1234",
            "--process-count",
            "2",
            "--process-id",
            "5",
            "report",
            "--workdir",
            "nowhere",
        ]
    )
    assert status == 2
    assert "--process-id / JAX_PROCESS_ID=5 must be in [0, 2)" in capsys.readouterr().err
