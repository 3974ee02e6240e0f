"""The sd_notify protocol (``man 3 sd_notify``): telling systemd we are ready, reloading, stopping or alive.

systemd passes ``$NOTIFY_SOCKET``, a datagram unix socket (a path, or an abstract name when it starts with
``@``); each message is one datagram of newline-separated ``KEY=VALUE`` assignments. With ``NotifyAccess=main``
systemd accepts messages only from the main process (it checks the sender's pid), so only the supervisor
notifies. Without ``$NOTIFY_SOCKET`` (not under systemd, or ``Type=simple``) every method is a no-op that
returns False. Pure stdlib; the environment is read when a :class:`Notifier` is built, never at import.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Final

#: A notification that cannot be queued within this time is dropped: it only happens when systemd is stuck,
#: and a watchdog ping sent from the event loop must not stall it longer than this.
SEND_TIMEOUT_S: Final = 1.0
_ENV_KEYS: Final = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """A sender of sd_notify messages to the socket named by ``$NOTIFY_SOCKET``.

    Args:
        env: the environment to read (default ``os.environ``), read once, here.
        unset_environment: remove the three variables from ``os.environ`` afterwards (``sd_notify``'s
            ``unset_environment``), so that child processes do not notify in the supervisor's name.

    Every method returns True when the message was sent, False when notification is off or sending failed
    (an unreachable systemd is not a reason for the daemon to stop).
    """

    def __init__(self, env: Mapping[str, str] | None = None, *, unset_environment: bool = False) -> None:
        environ = os.environ if env is None else env
        self.address = _address(environ.get("NOTIFY_SOCKET", ""))
        self._watchdog_interval = watchdog_interval(environ)
        self._sock: socket.socket | None = None
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.settimeout(SEND_TIMEOUT_S)
        if unset_environment:
            for key in _ENV_KEYS:
                os.environ.pop(key, None)

    @property
    def enabled(self) -> bool:
        """Whether systemd asked for notifications."""
        return self._sock is not None

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete: systemd starts ordered units and marks the service active."""
        return self.notify("READY=1", status=status)

    def reloading(self, status: str | None = None) -> bool:
        """A reload started; call :meth:`ready` when it is done.

        ``MONOTONIC_USEC`` (CLOCK_MONOTONIC in microseconds) lets systemd >= 253 tell this reload from a
        previous one; older versions ignore it.
        """
        return self.notify(
            "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}", status=status
        )

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown started (draining): the unit shows as deactivating and the ``TimeoutStopSec`` clock starts."""
        return self.notify("STOPPING=1", status=status)

    def status(self, text: str) -> bool:
        """A one-line status shown by ``systemctl status``."""
        return self.notify(status=text)

    def watchdog(self) -> bool:
        """Keep-alive ping; send one every :meth:`watchdog_interval` seconds."""
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the current start, reload or stop timeout kills us (e.g. a long drain)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def watchdog_interval(self) -> float | None:
        """Seconds between :meth:`watchdog` pings, or None when systemd's watchdog is off for this process."""
        return self._watchdog_interval

    def notify(self, *assignments: str, status: str | None = None) -> bool:
        """Send ``KEY=VALUE`` assignments (and ``STATUS=status``) in one datagram."""
        if self._sock is None or self.address is None:
            return False
        lines = list(assignments)
        if status is not None:
            # A newline would end the assignment and start a bogus one.
            lines.append("STATUS=" + " ".join(status.splitlines()))
        if not lines:
            return False
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError:  # ENOENT, ECONNREFUSED (systemd restarting), EAGAIN past the timeout
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between keep-alive pings: half of ``$WATCHDOG_USEC``, as ``sd_watchdog_enabled(3)`` recommends.

    None when the watchdog is off, the value is malformed, or ``$WATCHDOG_PID`` names another process (the
    variables were inherited by a child).
    """
    environ = os.environ if env is None else env
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


def _address(value: str) -> str | None:
    """The socket address of a ``$NOTIFY_SOCKET`` value; None when unset or not a unix socket we can use."""
    if value.startswith("@"):
        return "\0" + value[1:]  # Linux abstract namespace
    if value.startswith("/"):
        return value
    # Empty, relative, or "vsock:CID:PORT" (systemd >= 254 inside VMs), which this daemon does not run under.
    return None
