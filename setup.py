"""Build script: the compiled code is optional (aobd/_impl.py says what loads when).

Two kinds: the Cython twins in aobd/_fast (``.pyx``, each beside its pure-Python reference), and the engine
modules of ``aobd._impl.COMPILED_MODULES``, compiled unchanged from their ``.py`` source.

Set AOBD_BUILD_EXT=0 to skip them (pure-Python install), AOBD_CYTHON_ANNOTATE=1 for HTML annotation,
AOBD_CYTHON_DEBUG=1 to keep bounds checks on. A failed compile falls back to pure Python with a warning
unless AOBD_BUILD_EXT=1 demands the extension.
"""

import importlib.util
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

FAST_MODULES = ["jsonpatch", "routing", "sqlite_group"]


def compiled_sources() -> list[str]:
    """The sources of aobd._impl.COMPILED_MODULES (loaded by path: importing aobd here would be circular)."""
    spec = importlib.util.spec_from_file_location("_aobd_impl", os.path.join("aobd", "_impl.py"))
    assert spec is not None and spec.loader is not None
    impl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(impl)
    return [impl.source_path(module, "") for module in impl.COMPILED_MODULES]


class OptionalBuildExt(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # compiler missing, etc.
            self._give_up(exc)

    def build_extension(self, ext):  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._give_up(exc)

    def _give_up(self, exc: Exception) -> None:
        if os.environ.get("AOBD_BUILD_EXT") == "1":
            raise exc
        print(f"warning: aobd C extensions not built ({exc}); using pure Python", file=sys.stderr)


def extensions() -> list:
    if os.environ.get("AOBD_BUILD_EXT") == "0":
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        if os.environ.get("AOBD_BUILD_EXT") == "1":
            raise
        return []
    debug = os.environ.get("AOBD_CYTHON_DEBUG") == "1"
    twin_directives = {
        "language_level": "3",
        "boundscheck": debug,
        "wraparound": debug,
        "initializedcheck": debug,
        "cdivision": True,
        "embedsignature": True,
    }
    common = {
        "annotate": os.environ.get("AOBD_CYTHON_ANNOTATE") == "1",
        "quiet": True,
        "nthreads": os.cpu_count() or 1,
    }
    twins = [f"aobd/_fast/{name}.pyx" for name in FAST_MODULES if os.path.exists(f"aobd/_fast/{name}.pyx")]
    # The Python sources compile with Python's semantics kept whole: negative indexes wrap, indexes are checked,
    # division by zero raises (the twins' directives above would silently change what ``records[-1]`` means), and
    # annotations stay hints (typed, ``data: bytes`` would refuse a bytearray the source accepts).
    source_directives = {"language_level": "3", "annotation_typing": False}
    return cythonize(twins, compiler_directives=twin_directives, **common) + cythonize(
        compiled_sources(), compiler_directives=source_directives, **common
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
