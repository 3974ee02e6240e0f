"""Build script: the Cython twins in aobd/_fast are optional.

Set AOBD_BUILD_EXT=0 to skip them (pure-Python install), AOBD_CYTHON_ANNOTATE=1 for HTML annotation,
AOBD_CYTHON_DEBUG=1 to keep bounds checks on. A failed compile falls back to pure Python with a warning
unless AOBD_BUILD_EXT=1 demands the extension.
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

FAST_MODULES = ["jsonpatch", "routing", "sqlite_group"]


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
    directives = {
        "language_level": "3",
        "boundscheck": debug,
        "wraparound": debug,
        "initializedcheck": debug,
        "cdivision": True,
        "embedsignature": True,
    }
    sources = [f"aobd/_fast/{name}.pyx" for name in FAST_MODULES if os.path.exists(f"aobd/_fast/{name}.pyx")]
    return cythonize(
        sources,
        compiler_directives=directives,
        annotate=os.environ.get("AOBD_CYTHON_ANNOTATE") == "1",
        quiet=True,
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
