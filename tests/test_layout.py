"""The installed import names: everything lives under ``dsv4``, so a venv that also holds packages
named ``kernels`` (Hugging Face's), ``engine`` or ``cache`` breaks neither side."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"dsv4.cli": "dsv4cli", "dsv4.engine": "engine", "dsv4.kernels": "kernels", "dsv4.cache": "cache",
           "dsv4.train": "train"}


def test_every_installed_package_is_under_dsv4():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p.startswith("dsv4.") for p in cfg["packages"]), cfg["packages"]
    assert cfg["package-dir"] == FOLDERS
    # every source folder with an __init__.py is listed (nothing silently left out of a wheel)
    listed = set(cfg["packages"])
    for name, folder in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            assert ".".join((name, *rel.parts)) in listed, f"{init.parent} is not installed"


def test_imports_resolve_to_this_checkout():
    import dsv4.cache
    import dsv4.engine
    import dsv4.kernels

    for mod, folder in ((dsv4.engine, "engine"), (dsv4.kernels, "kernels"), (dsv4.cache, "cache")):
        assert Path(mod.__file__).resolve().parent == ROOT / folder


def test_foreign_packages_named_kernels_engine_cache_do_not_shadow_dsv4(tmp_path):
    """Packages called kernels / engine / cache first on sys.path (as Hugging Face's ``kernels`` is in a
    venv with transformers): the whole CLI still imports, and those names stay the other packages'."""
    for name in ("kernels", "engine", "cache"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"OWNER = 'someone else: {name}'\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1]);"
            "import dsv4.cli.main, dsv4.cli.chat, dsv4.cli.bench, dsv4.engine.runtime.conversation,"
            " dsv4.engine.checkpoint.convert, dsv4.train.trainer, dsv4.kernels;"
            "from dsv4.kernels import ExpertSet, linear;"
            "import kernels, engine, cache;"
            "print(kernels.OWNER, engine.OWNER, cache.OWNER, sep='|')")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "someone else: kernels|someone else: engine|someone else: cache"


def test_hugging_face_kernels_beside_dsv4_when_installed(tmp_path):
    """Where Hugging Face's ``kernels`` distribution is installed, both import in one process (run
    outside the checkout, whose own folders would otherwise be first on sys.path)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("kernels")
    except PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed here (the shadowing test covers the clash)")
    code = "import kernels, dsv4.kernels; print(kernels.__file__); print(dsv4.kernels.__file__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs, ours = r.stdout.split()
    # theirs may sit under ROOT (a .venv inside the checkout), never in the checkout's own folder
    assert Path(theirs).resolve().parent != ROOT / "kernels"
    assert Path(ours).resolve().parent == ROOT / "kernels"


def test_transformers_imports_from_the_checkout_root():
    """Run from the checkout root (the root first on sys.path, as under ``python -m pytest``), the
    checkout's kernels/ folder would shadow Hugging Face's ``kernels``, which transformers imports:
    hf.transformers_names keeps the root off the path while transformers loads."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("kernels")
        distribution("transformers")
    except PackageNotFoundError:
        pytest.skip("needs transformers with Hugging Face's kernels installed")
    code = ("import kernels as wrong; print(wrong.__file__);"
            "from dsv4.engine.tools.hf import transformers_names;"
            "transformers_names('DeepseekV4ForCausalLM', 'DynamicCache');"
            "import sys; print(sys.modules['kernels'].__file__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    before, after = r.stdout.split()
    # without the guard the first import is the checkout's folder and transformers fails to load
    assert Path(before).resolve().parent == ROOT / "kernels"
    assert Path(after).resolve().parent != ROOT / "kernels"
