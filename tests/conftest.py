"""Shared fixtures: a throw-away copy of the project, and ways to run make and the tools in it."""

import io
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]

# Variables of an outer `make test` that must not leak into the makes we start
_OUTER_MAKE_VARS = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "KCONFIG_CONFIG", "srctree", "CONFIG_")


def _project_files():
    """Tracked and untracked-but-not-ignored files, as git sees them (None outside git)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return [name for name in out.decode().split("\0") if name]


@pytest.fixture(scope="session")
def _pristine_tree(tmp_path_factory):
    dest = tmp_path_factory.mktemp("pristine") / "repo"
    files = _project_files()
    if files is None:
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
            ".git", ".venv", "runs", "data_cache", "generated", "__pycache__", ".config", ".config.old"))
    else:
        for name in files:
            src = REPO / name
            if src.is_file():  # listed by git but deleted in the working tree: skip
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / name)  # keeps mtimes: pyproject.toml stays older than the deps stamp
    return dest


@pytest.fixture
def tree(_pristine_tree, tmp_path):
    """A private copy of the project (no .config, no generated files, no .venv)."""
    dest = tmp_path / "repo"
    shutil.copytree(_pristine_tree, dest, symlinks=True)
    return dest


@pytest.fixture(scope="session")
def _pristine_ktree(_pristine_tree, tmp_path_factory):
    dest = tmp_path_factory.mktemp("pristine-kconfig") / "repo"
    for src in _pristine_tree.rglob("*"):
        rel = src.relative_to(_pristine_tree)
        if src.is_file() and (src.name.startswith("Kconfig") or rel.parts[0] == "defconfigs"):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture
def ktree(_pristine_ktree, tmp_path):
    """A private copy of just the Kconfig files and defconfigs/ (all the configuration commands read)."""
    dest = tmp_path / "repo"
    shutil.copytree(_pristine_ktree, dest)
    return dest


@pytest.fixture(scope="session")
def venv(tmp_path_factory):
    """The virtual environment running the tests, for make's VENV= (no install in tests)."""
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix)
    # Not in a venv: a stand-in whose bin/python is this interpreter
    fake = tmp_path_factory.mktemp("venv")
    (fake / "bin").mkdir()
    (fake / "bin" / "python").symlink_to(sys.executable)
    return fake


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in _OUTER_MAKE_VARS}
    env.update(extra)
    return env


@pytest.fixture
def make(tree, venv):
    """make(*targets, VAR=value, ...) in the copy, with VENV= the test venv; never installs."""

    def run(*targets, check=False, **variables):
        cmd = ["make", "--no-print-directory", "-C", str(tree), "-o", "{}/.deps-stamp".format(venv),
               "VENV={}".format(venv), *targets, *("{}={}".format(k, v) for k, v in variables.items())]
        result = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=120)
        return _check(result, " ".join(cmd), check)

    return run


def _check(result, what, check):
    if check and result.returncode != 0:
        raise AssertionError("{} failed:\n{}{}".format(what, result.stdout, result.stderr))
    return result


@pytest.fixture
def kconfig(ktree, monkeypatch):
    """kconfig(*args): what `python -m scripts.kconfig ARGS` does in ktree, run in this process
    (fast); returns .returncode, .stdout, .stderr like subprocess.run."""
    from scripts.kconfig import cli

    def run(*args, check=False, env=None):
        out, err = io.StringIO(), io.StringIO()
        with monkeypatch.context() as m:
            m.chdir(ktree)
            for name in _OUTER_MAKE_VARS:
                m.delenv(name, raising=False)
            for name, value in (env or {}).items():
                m.setenv(name, value)
            with redirect_stdout(out), redirect_stderr(err):
                try:
                    code = cli.main(list(args))
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else 1
        result = SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
        return _check(result, "kconfig " + " ".join(args), check)

    return run


@pytest.fixture
def kconfig_process(ktree):
    """kconfig_process(*args): `python -m scripts.kconfig ARGS` as a process in ktree."""

    def run(*args, check=False, env=None):
        env = clean_env(PYTHONPATH=str(REPO), **(env or {}))
        result = subprocess.run([sys.executable, "-m", "scripts.kconfig", *args], cwd=ktree, capture_output=True,
                                text=True, env=env, timeout=60)
        return _check(result, "kconfig " + " ".join(args), check)

    return run


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of small numeric tests: steadier on a shared 2-core machine."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
