"""Canonical JSON and the content hashes built on it.

A document's *version* is ``sha256:<hex>`` of its canonical JSON: keys sorted, no whitespace, UTF-8. orjson
gives exactly that with OPT_SORT_KEYS and is ~10x faster than ``json.dumps(sort_keys=True)``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

_OPTS = orjson.OPT_SORT_KEYS
# Bound once: an attribute of a module is looked up at every call, a global of this module is not (compiled).
_dumps = orjson.dumps
_sha256 = hashlib.sha256
#: Refs of recently hashed small blobs, by content. The same blobs recur run after run (a workflow's document, the
#: same inputs and outputs), and looking one up costs a tenth of hashing it: in-process W6 hashes 15 blobs per run.
#: Bounded to _RECENT_MAX entries of at most _RECENT_SIZE bytes (about 2 MiB), cleared when full.
_RECENT_REFS: dict[bytes, str] = {}
_RECENT_MAX = 2048
_RECENT_SIZE = 1024


def canonical_json(value: Any) -> bytes:
    """Canonical JSON bytes of a JSON value (raises TypeError for non-JSON values such as sets)."""
    return _dumps(value, None, _OPTS)


def sha256_ref(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``: the ref the CAS stores it under."""
    if len(data) > _RECENT_SIZE or type(data) is not bytes:
        return "sha256:" + _sha256(data).hexdigest()
    ref = _RECENT_REFS.get(data)
    if ref is None:
        ref = "sha256:" + hashlib.sha256(data).hexdigest()
        if len(_RECENT_REFS) >= _RECENT_MAX:
            _RECENT_REFS.clear()
        _RECENT_REFS[data] = ref
    return ref


def version_of(document: Any) -> str:
    """The version of a workflow document: the sha256 ref of its canonical JSON."""
    return sha256_ref(canonical_json(document))


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)
