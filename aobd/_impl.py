"""Which implementation of aobd's hot paths loads, as ``AOBD_IMPL`` asks: the Python source or its compiled form.

Two kinds of compiled code exist:

* the Cython twins in ``aobd/_fast`` (``.pyx`` files next to their pure-Python references ``_py_*.py``), chosen
  by ``aobd._fast``;
* the modules of :data:`COMPILED_MODULES`: the engine's per-node path, compiled unchanged from their ``.py`` source
  by Cython (``setup.py``). The source is the specification and what ``AOBD_IMPL=python`` runs; the build is the
  same code without the interpreter's dispatch. Measured on in-process W6 once the commit stopped bounding it:
  1.11-1.16x at 64 runs in flight (docs/performance.md, "the engine compiled").

A compiled module is an extension file next to its source (``machine.cpython-311-x86_64-linux-gnu.so`` beside
``machine.py``), which Python's own import would always prefer. :func:`install` puts a finder in front that
decides instead:

* ``AOBD_IMPL=python``: the source, always;
* ``AOBD_IMPL=c``: the extension, and an ImportError if it is missing or older than its source (a build that does
  not match the code must not pass a test run for it);
* ``AOBD_IMPL=auto`` (default): the extension when it is at least as new as its source, else the source with a
  warning, so an edited module is never shadowed by a stale build (``make build`` rebuilds it).

This module imports nothing of aobd: ``aobd/__init__.py`` installs the finder before any compiled module loads.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import warnings
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

VALID: tuple[str, ...] = ("auto", "c", "python")

#: Modules compiled from their unchanged source: what the per-node path of the engine runs through (setup.py
#: builds exactly these).
COMPILED_MODULES: tuple[str, ...] = (
    "aobd.engine.driver",
    "aobd.engine.effects",
    "aobd.engine.machine",
    "aobd.engine.runlock",
    "aobd.model.canonical",
    "aobd.model.events",
    "aobd.model.expr",
    "aobd.nodes.function",
    "aobd.store.memory",
    "aobd.store.sqlite_log",
)


def wanted() -> str:
    """``AOBD_IMPL``, checked: "auto", "c" or "python"."""
    impl = os.environ.get("AOBD_IMPL", "auto").strip().lower() or "auto"
    if impl not in VALID:
        raise ImportError(f"AOBD_IMPL={impl!r} is not one of {', '.join(VALID)}")
    return impl


def source_path(module: str, root: str) -> str:
    """The source file of ``module`` under the directory holding the ``aobd`` package."""
    return os.path.join(root, *module.split(".")) + ".py"


def choose(source: str, impl: str) -> str:
    """The file to load for a compiled module whose source is ``source``: the source or its extension.

    Raises:
        ImportError: ``impl`` is "c" and no extension at least as new as the source exists.
    """
    if impl == "python":
        return source
    stem = source[: -len(".py")]
    extension = next(
        (stem + s for s in importlib.machinery.EXTENSION_SUFFIXES if os.path.exists(stem + s)),
        None,
    )
    # A module's declarations for Cython (``machine.pxd`` beside ``machine.py``) are part of its compiled form.
    declarations = stem + ".pxd"
    newest = max(os.stat(path).st_mtime for path in (source, declarations) if os.path.exists(path))
    if extension is not None and os.stat(extension).st_mtime >= newest:
        return extension
    why = "is not built" if extension is None else "is older than its source"
    if impl == "c":
        raise ImportError(f"AOBD_IMPL=c but the compiled {os.path.basename(source)} {why}; run `make build`")
    if extension is not None:
        warnings.warn(
            f"{extension} {why}; running the source instead (run `make build`)",
            RuntimeWarning,
            stacklevel=2,
        )
    return source


class _Chooser:
    """Finds the modules of :data:`COMPILED_MODULES` as :func:`choose` decides; leaves every other to Python.

    A meta path finder by protocol (``find_spec``), not by subclassing ``importlib.abc.MetaPathFinder``: importing
    ``importlib.abc`` costs about 6 ms, which every ``aobctl`` command would pay."""

    def __init__(self, impl: str) -> None:
        self.impl = impl
        self.modules = frozenset(COMPILED_MODULES)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in self.modules or not path:
            return None
        name = fullname.rpartition(".")[2]
        for directory in path:
            source = os.path.join(directory, name + ".py")
            if os.path.exists(source):
                break
        else:
            return None
        chosen = choose(source, self.impl)
        loader: importlib.machinery.SourceFileLoader | importlib.machinery.ExtensionFileLoader
        if chosen == source:
            loader = importlib.machinery.SourceFileLoader(fullname, source)
        else:
            loader = importlib.machinery.ExtensionFileLoader(fullname, chosen)
        return importlib.util.spec_from_file_location(fullname, chosen, loader=loader)


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Chooser) for f in sys.meta_path):
        sys.meta_path.insert(0, _Chooser(wanted()))


def loaded_compiled(module: ModuleType) -> bool:
    """Whether ``module`` was loaded from an extension (its compiled form)."""
    return isinstance(getattr(module.__spec__, "loader", None), importlib.machinery.ExtensionFileLoader)
