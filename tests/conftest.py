"""Shared fixtures and helpers.

- ``run_cli(*args)`` / the ``cli`` fixture: run the ``dsv4`` command in a subprocess (the same
  interpreter), -> CompletedProcess with text stdout/stderr.
- ``invoke_cli(*args)`` / the ``cli_inprocess`` fixture: the same command run inside this process
  (typer's CliRunner; no interpreter start and torch import per call), -> the same fields
  (returncode, stdout, stderr). For tests of what a command prints and returns; use run_cli where
  the process itself matters (signals, a terminal, a crash that must not take pytest with it).
- ``demo_checkpoint``: a published-layout checkpoint of the tiny demo model, written once per session.
- ``import_or_skip(name)``: a test dependency; skipped when missing, except in CI (env CI=true),
  where a missing dependency is a failure (a skipped module must not turn CI green).
- Markers: ``gpu`` tests skip without CUDA; ``slow`` tests (long versions of quick tests) run only
  with ``--slow`` or when selected with ``-m slow``.
"""

import os
import subprocess
import sys

import pytest
import torch

from dsv4.engine.tools.synthetic import random_tensors, tiny_configs

TINY = tiny_configs()
CLI = [sys.executable, "-m", "dsv4.cli.main"]
# a guard against a hung subprocess, not a time limit: generous for a loaded 2-core machine
CLI_TIMEOUT_S = 1800


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def import_or_skip(name: str):
    """Import a test dependency; without it skip the caller's module, but fail in CI (CI=true)."""
    if in_ci():
        import importlib

        try:
            return importlib.import_module(name)
        except ImportError as e:
            pytest.fail(f"CI=true and the test dependency {name!r} is missing ({e}); install the test extra "
                        "(pip install -e '.[test]')", pytrace=False)
    return pytest.importorskip(name)


def run_cli(*args, input: str | None = None, env: dict | None = None, timeout: float = CLI_TIMEOUT_S,
            cwd=None) -> subprocess.CompletedProcess:
    """``dsv4 ARGS...`` in a subprocess; env: extra variables over this process's environment."""
    full_env = None if env is None else {**os.environ, **env}
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, input=input,
                          env=full_env, timeout=timeout, cwd=cwd)


def invoke_cli(*args, input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """``dsv4 ARGS...`` run in this process; sys.argv and torch's CPU thread count are restored
    afterwards. An exception that escapes the command (a traceback in a real run) is re-raised."""
    from typer.testing import CliRunner

    from dsv4.cli.main import app

    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = ["dsv4", *map(str, args)]
    try:
        res = CliRunner().invoke(app, [str(a) for a in args], input=input, env=env)
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return subprocess.CompletedProcess(["dsv4", *map(str, args)], res.exit_code, res.stdout, res.stderr)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="also run the tests marked slow (the long versions of the default ones)")


def pytest_collection_modifyitems(config, items):
    skip_gpu = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA device")
    markexpr = config.getoption("-m") or ""
    run_slow = config.getoption("--slow") or "slow" in markexpr
    skip_slow = None if run_slow else pytest.mark.skip(reason="slow: run with --slow (or -m slow)")
    for item in items:
        if skip_gpu is not None and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        if skip_slow is not None and "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def cli():
    """run_cli as a fixture: cli("bench", "decode", ...) -> CompletedProcess."""
    return run_cli


@pytest.fixture(scope="session")
def cli_inprocess():
    """invoke_cli as a fixture: cli_inprocess("inspect-cache", "--json") -> CompletedProcess."""
    return invoke_cli


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory):
    """A published-layout checkpoint (FP8 / MXFP4 / BF16 as published, byte tokenizer) of the tiny
    demo model, written once per session."""
    from dsv4.engine.checkpoint.published import write_published_checkpoint
    from dsv4.engine.tools.synthetic import demo_config

    return write_published_checkpoint(demo_config(), tmp_path_factory.mktemp("demo") / "ck", seed=2)


@pytest.fixture(scope="session")
def tiny_cfg():
    return TINY["swa-csa-hca"]


@pytest.fixture(scope="session")
def tiny_tensors(tiny_cfg):
    return random_tensors(tiny_cfg, seed=1)
