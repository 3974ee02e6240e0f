"""AOBD_IMPL picks the form of the compiled engine modules: the source, or its build when that is not stale."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

from aobd import _fast, _impl

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def test_the_engine_modules_load_as_aobd_impl_asks() -> None:
    impl = _impl.wanted()
    for name in _impl.COMPILED_MODULES:
        module = importlib.import_module(name)
        if impl == "python":
            assert not _impl.loaded_compiled(module), name
        elif impl == "c":
            assert _impl.loaded_compiled(module), name
    if impl != "auto":
        assert _fast.__impl__ == impl  # the twins follow the same variable


def pair(tmp_path: Path, *, built: bool, stale: bool = False) -> str:
    source = tmp_path / "mod.py"
    source.write_text("X = 1\n")
    if built:
        extension = tmp_path / f"mod{SUFFIX}"
        extension.write_bytes(b"")
        os.utime(source, (1000, 1000))
        os.utime(extension, (500, 500) if stale else (2000, 2000))
    return str(source)


def test_python_always_runs_the_source(tmp_path: Path) -> None:
    source = pair(tmp_path, built=True)
    assert _impl.choose(source, "python") == source


@pytest.mark.parametrize("impl", ["auto", "c"])
def test_a_current_build_is_chosen(tmp_path: Path, impl: str) -> None:
    source = pair(tmp_path, built=True)
    assert _impl.choose(source, impl) == str(tmp_path / f"mod{SUFFIX}")


def test_auto_never_runs_a_build_older_than_its_source(tmp_path: Path) -> None:
    source = pair(tmp_path, built=True, stale=True)
    with pytest.warns(RuntimeWarning, match="older than its source"):
        assert _impl.choose(source, "auto") == source


def test_a_build_older_than_its_declarations_is_stale(tmp_path: Path) -> None:
    """A module's .pxd (its classes' fields for Cython) is part of its compiled form: editing it alone makes the
    build stale."""
    source = pair(tmp_path, built=True)
    declarations = tmp_path / "mod.pxd"
    declarations.write_text("cdef class X:\n    cdef public object y\n")
    os.utime(declarations, (1500, 1500))
    assert _impl.choose(source, "auto") == str(tmp_path / f"mod{SUFFIX}")
    os.utime(declarations, (3000, 3000))
    with pytest.warns(RuntimeWarning, match="older than its source"):
        assert _impl.choose(source, "auto") == source


def test_auto_runs_the_source_when_nothing_is_built(tmp_path: Path) -> None:
    source = pair(tmp_path, built=False)
    assert _impl.choose(source, "auto") == source


@pytest.mark.parametrize(("built", "stale", "why"), [(False, False, "is not built"), (True, True, "older")])
def test_c_refuses_a_missing_or_stale_build(tmp_path: Path, built: bool, stale: bool, why: str) -> None:
    with pytest.raises(ImportError, match=why):
        _impl.choose(pair(tmp_path, built=built, stale=stale), "c")


def test_an_unknown_aobd_impl_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AOBD_IMPL", "fast")
    with pytest.raises(ImportError, match="not one of auto, c, python"):
        _impl.wanted()
