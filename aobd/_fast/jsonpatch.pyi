"""Stub for the compiled twin of ``aobd._fast._py_jsonpatch``; the reference documents the semantics."""

from collections.abc import Mapping, Sequence
from typing import Any, Final

__all__ = ["MAX_DEPTH", "apply_patch", "parse_pointer", "resolve_pointer"]

MAX_DEPTH: Final[int]

def parse_pointer(pointer: str) -> list[str]: ...
def resolve_pointer(doc: Any, pointer: str) -> Any: ...
def apply_patch(doc: Any, ops: Sequence[Mapping[str, Any]]) -> Any: ...
