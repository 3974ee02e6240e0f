"""The one exception tree of aobd.

Every error a user can cause is an :class:`AobdError` whose message says what was wrong, where (file, node id,
JSON pointer) and, when it helps, what would be right. ``code`` is a stable machine-readable identifier used in
events, CLI JSON and (later) the HTTP error shape ``{"error": {"code", "message", "details"}}``.
"""

from __future__ import annotations

from typing import Any


class AobdError(Exception):
    """Base of every error aobd raises on purpose."""

    code = "aobd_error"

    def __init__(self, message: str, *, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class ConfigError(AobdError):
    """A configuration key is missing, malformed or contradictory; the message names the key."""

    code = "config_error"


class WorkflowInvalid(AobdError):
    """A workflow document failed validation; ``details`` holds one entry per problem."""

    code = "workflow_invalid"


class ExpressionError(AobdError):
    """A JMESPath binding or condition does not compile or failed to evaluate."""

    code = "expression_error"


class PatchError(AobdError):
    """A JSON Patch could not be applied (RFC 6902 failure: bad pointer, failed test, bad op)."""

    code = "patch_error"

    def __init__(self, message: str, *, op_index: int | None = None, path: str | None = None) -> None:
        details = [{"op_index": op_index, "path": path}] if op_index is not None or path is not None else []
        super().__init__(message, details=details)
        self.op_index = op_index
        self.path = path


class PointerError(PatchError):
    """A JSON Pointer (RFC 6901) is malformed or does not resolve."""

    code = "pointer_error"


class SsrfDenied(AobdError):
    """An outbound HTTP target is in a denied range and not allow-listed."""

    code = "ssrf_denied"


class StoreError(AobdError):
    """A storage backend failed (I/O, corruption)."""

    code = "store_error"


class BusError(StoreError):
    """The Kafka bus failed: a send was not acknowledged, a commit or a poll failed, or a client error is fatal."""

    code = "bus_error"


class ConflictError(StoreError):
    """An append's expected seq did not match: another writer appended to the run first."""

    code = "seq_conflict"


class IntegrityError(StoreError):
    """A blob read from the CAS does not hash to its ref."""

    code = "cas_integrity"


class NotFound(AobdError):
    """A run, blob, workflow or patch does not exist."""

    code = "not_found"


class NodeError(AobdError):
    """A node attempt failed. ``retryable`` tells the engine whether another attempt may succeed."""

    code = "node_error"

    def __init__(
        self, message: str, *, code: str | None = None, retryable: bool = True, traceback: str | None = None
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.retryable = retryable
        #: The innermost frames of a handler that raised, when the attempt ran elsewhere (a runner).
        self.traceback = traceback


class BadRequest(AobdError):
    """The request is malformed (body, parameters); 400."""

    code = "bad_request"


class Unauthorized(AobdError):
    """No or an unknown bearer token; 401."""

    code = "unauthorized"


class Forbidden(AobdError):
    """The token's role does not allow this operation; 403."""

    code = "forbidden"


class Conflict(AobdError):
    """The object is not in a state that allows this (a decided ticket, a finished run); 409."""

    code = "conflict"


class Misdirected(Conflict):
    """A command for a run another daemon of the cluster drives. The API forwards it to ``owner_url`` when it
    knows the owner (from the admin socket, which has no token to pass on, only with ``cluster.peer_token``);
    otherwise it is a 409."""

    code = "misdirected"

    def __init__(self, message: str, *, owner: str | None = None, owner_url: str | None = None) -> None:
        super().__init__(message, details=[{"owner": owner, "owner_url": owner_url}] if owner else None)
        self.owner = owner
        self.owner_url = owner_url


class PayloadTooLarge(AobdError):
    code = "payload_too_large"


class RateLimited(AobdError):
    """Too many requests of one kind for a workspace; 429 with Retry-After."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: float, workspace: str = "", kind: str = "") -> None:
        super().__init__(message, details=[{"retry_after_s": retry_after_s, "workspace": workspace, "kind": kind}])
        self.retry_after_s = retry_after_s


class Unavailable(AobdError):
    """The daemon is draining or a dependency is down; 503."""

    code = "unavailable"
