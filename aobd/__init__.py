"""aobd: a workflow orchestration daemon for agentic workflows.

Workflows are DAGs stored as data; agents running inside a run may propose RFC 6902 patches to that run's
graph, which are validated, kept as overlays on the never-mutated base, and take effect between two routing
decisions. Everything is an append-only event.
"""

from aobd import _impl

__version__ = "0.1.0"

# Before anything else of aobd loads: which form of the compiled engine modules to import (AOBD_IMPL).
_impl.install()
