"""Which sync handlers an engine with a remote executor runs inline: all of them, until one proves slow.

With ``[planes] inline_sync_handlers = "auto"`` (the default) an orchestrator calls a sync function handler not
marked ``blocking`` itself, in the step that made its node ready (``Engine._run_inline``), which saves the two zmq
hops and the runner's work of sending it to the runner plane. The price of inline is that the handler holds the
orchestrator's event loop, and so every run of its shard, while it runs. This policy bounds that price:

- **Slow:** an inline call that takes longer than ``budget_ms`` *demotes* its handler: from then on its attempts
  go to the runner plane, as with ``inline_sync_handlers = false``. The call that tripped the budget has run.
- **Hung or crashed:** a handler that never returns (or takes the process down) cannot be measured. Before each
  ready set the policy writes the set's handlers to a *marker* that outlives the process; the orchestrator that
  replaces one that died reads its predecessor's marker and demotes those handlers before it resumes any run. So a
  hanging handler costs one restart, not a restart loop.

Demotions are shared through a *ledger* the daemon's orchestrators append to, read at start and follow while they
run (:meth:`InlinePolicy.learn`, every second in the planes), so a sibling or a restarted orchestrator does not
learn the same lesson again. They last as long as the daemon: the supervisor clears the
ledger when it starts, so a deploy with fixed handlers starts trusting them again.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Protocol


class InlineMarker(Protocol):
    """Where the handlers running inline right now are written, for the next process to read should this one
    die meanwhile (:class:`aobd.planes.inline_marker.FileMarker`)."""

    def running(self, refs: Collection[str]) -> None: ...

    def idle(self) -> None: ...


class DemotionLedger(Protocol):
    """The daemon's demoted handlers, shared by its orchestrators."""

    def record(self, ref: str) -> None: ...

    def read(self) -> set[str]: ...


#: ``on_demote(ref, reason, why)``: told once per handler demoted; ``reason`` is "slow" or "died" (the
#: orchestrator logs it and counts it in metrics by reason).
OnDemote = Callable[[str, str, str], None]


class InlinePolicy:
    """The ``auto`` rule of one engine; see the module docstring.

    Args:
        budget_ms: the longest inline call a handler may take and stay inline.
        demoted: handlers known slow already (the ledger's).
        marker: where the running set is written (None: nowhere, as in tests).
        ledger: where demotions are shared (None: nowhere).
        on_demote: told of each demotion.
    """

    __slots__ = ("budget_ms", "demoted", "ledger", "marker", "on_demote")

    def __init__(
        self,
        budget_ms: float,
        *,
        demoted: Iterable[str] = (),
        marker: InlineMarker | None = None,
        ledger: DemotionLedger | None = None,
        on_demote: OnDemote | None = None,
    ) -> None:
        if budget_ms <= 0:
            raise ValueError(f"the inline budget must be positive, not {budget_ms} ms")
        self.budget_ms = budget_ms
        self.demoted: set[str] = set(demoted)
        self.marker = marker
        self.ledger = ledger
        self.on_demote = on_demote

    def allows(self, ref: str) -> bool:
        """Whether the handler ``ref`` may still run inline."""
        return ref not in self.demoted

    def entering(self, refs: Collection[str]) -> None:
        """A ready set of these handlers is about to be called inline."""
        if self.marker is not None:
            self.marker.running(refs)

    def left(self) -> None:
        """The ready set's calls are over (whatever they returned or raised)."""
        if self.marker is not None:
            self.marker.idle()

    def observed(self, ref: str, duration_ms: float) -> None:
        """An inline call of ``ref`` took ``duration_ms``: over the budget, the handler is demoted."""
        if duration_ms > self.budget_ms and ref not in self.demoted:
            self.demote(ref, "slow", f"an inline call took {duration_ms:.1f} ms (budget {self.budget_ms:g} ms)")

    def learn(self) -> set[str]:
        """Take up the demotions other orchestrators recorded in the ledger since: their calls are not run
        inline here either. Not told to ``on_demote`` (the orchestrator that demoted a handler counts it).
        Returns the refs new to this policy."""
        if self.ledger is None:
            return set()
        new = self.ledger.read() - self.demoted
        self.demoted |= new
        return new

    def demote(self, ref: str, reason: str, why: str) -> None:
        """Send ``ref``'s attempts to the runner plane from now on (``reason``: "slow" or "died")."""
        if ref in self.demoted:
            return
        self.demoted.add(ref)
        if self.ledger is not None:
            self.ledger.record(ref)
        if self.on_demote is not None:
            self.on_demote(ref, reason, why)
