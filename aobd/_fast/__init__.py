"""Hot paths with two implementations: the pure-Python reference and its Cython twin.

The choice is made once, here, at import (as psycopg does with ``PSYCOPG_IMPL``):

* ``AOBD_IMPL=python``: the pure-Python references (``_py_jsonpatch``, ``_py_routing``, ``_py_sqlite_group``), the
  specification.
* ``AOBD_IMPL=c``: the compiled twins; an ImportError if they were not built (``make build``).
* ``AOBD_IMPL=auto`` (default): compiled when available, else pure Python.

Callers import from ``aobd._fast`` only; ``__impl__`` records which one was chosen ("c" or "python") so the
daemon can log it and export it as a metric label. The engine modules compiled from their own source are chosen by
the same ``AOBD_IMPL``, in ``aobd._impl``.
"""

from __future__ import annotations

from types import ModuleType

from aobd import _impl


def _choose() -> tuple[ModuleType, ModuleType, ModuleType, str]:
    wanted = _impl.wanted()
    from aobd._fast import _py_jsonpatch, _py_routing, _py_sqlite_group

    if wanted == "python":
        return _py_jsonpatch, _py_routing, _py_sqlite_group, "python"
    try:
        from aobd._fast import jsonpatch, routing, sqlite_group
    except ImportError as exc:
        if wanted == "c":
            raise ImportError(
                "AOBD_IMPL=c but the compiled extensions are not built; run `make build` "
                "(or `python setup.py build_ext --inplace`)"
            ) from exc
        return _py_jsonpatch, _py_routing, _py_sqlite_group, "python"
    return jsonpatch, routing, sqlite_group, "c"


_patch_mod, _routing_mod, _sqlite_group_mod, __impl__ = _choose()

apply_patch = _patch_mod.apply_patch
resolve_pointer = _patch_mod.resolve_pointer
parse_pointer = _patch_mod.parse_pointer
Router = _routing_mod.Router
SqliteGroupWriter = _sqlite_group_mod.GroupWriter

__all__ = ["Router", "SqliteGroupWriter", "__impl__", "apply_patch", "parse_pointer", "resolve_pointer"]
