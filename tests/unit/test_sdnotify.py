"""sd_notify against a real datagram socket standing in for systemd (no systemd needed)."""

from __future__ import annotations

import os
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from aobd.daemon.sdnotify import Notifier, watchdog_interval

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="sd_notify needs unix sockets")


class FakeSystemd:
    """The receiving end of $NOTIFY_SOCKET, reading each datagram with the sender's credentials as systemd does."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        # systemd enables SO_PASSCRED to learn the sender's pid (NotifyAccess=main checks it).
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(5)

    def receive(self) -> tuple[dict[str, str], int]:
        """One message as {KEY: VALUE} and the sender's pid."""
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _uid, _gid = struct.unpack("3i", payload[: struct.calcsize("3i")])
        assignments = dict(line.split("=", 1) for line in data.decode().split("\n"))
        return assignments, pid

    def nothing_pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(5)
        return False


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[tuple[FakeSystemd, str]]:
    path = str(tmp_path / "notify")
    fake = FakeSystemd(path)
    yield fake, path
    fake.sock.close()


def test_lifecycle_messages_reach_the_socket_from_this_pid(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd
    with Notifier({"NOTIFY_SOCKET": path}) as notifier:
        assert notifier.enabled

        assert notifier.ready(status="serving on 127.0.0.1:7070")
        message, pid = fake.receive()
        assert message == {"READY": "1", "STATUS": "serving on 127.0.0.1:7070"}
        assert pid == os.getpid()

        assert notifier.watchdog()
        assert fake.receive()[0] == {"WATCHDOG": "1"}

        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notifier.reloading()
        message, _ = fake.receive()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert message.keys() == {"RELOADING", "MONOTONIC_USEC"}
        assert message["RELOADING"] == "1"
        assert before <= int(message["MONOTONIC_USEC"]) <= after

        assert notifier.status("draining: 3 attempts in flight")
        assert fake.receive()[0] == {"STATUS": "draining: 3 attempts in flight"}

        assert notifier.stopping()
        assert fake.receive()[0] == {"STOPPING": "1"}

        assert notifier.extend_timeout(12.5)
        assert fake.receive()[0] == {"EXTEND_TIMEOUT_USEC": "12500000"}


def test_status_cannot_inject_assignments(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd
    with Notifier({"NOTIFY_SOCKET": path}) as notifier:
        notifier.status("line one\nREADY=1")
        assert fake.receive()[0] == {"STATUS": "line one READY=1"}


def test_abstract_namespace_socket() -> None:
    name = f"aobd-test-{uuid.uuid4().hex}"
    fake = FakeSystemd("\0" + name)
    try:
        with Notifier({"NOTIFY_SOCKET": "@" + name}) as notifier:
            assert notifier.ready()
            assert fake.receive()[0] == {"READY": "1"}
    finally:
        fake.sock.close()


@pytest.mark.parametrize("value", ["", "relative/path", "vsock:2:1234"])
def test_without_a_usable_socket_everything_is_a_no_op(value: str) -> None:
    env = {"NOTIFY_SOCKET": value} if value else {}
    with Notifier(env) as notifier:
        assert not notifier.enabled
        assert not notifier.ready()
        assert not notifier.watchdog()
        assert not notifier.stopping()


def test_a_vanished_systemd_is_not_an_error(tmp_path: Path) -> None:
    with Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}) as notifier:
        assert notifier.enabled
        assert notifier.ready() is False


def test_environment_is_read_at_construction_and_can_be_unset(
    systemd: tuple[FakeSystemd, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, path = systemd
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier(unset_environment=True)
    try:
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            assert key not in os.environ  # children will not notify in our name
        assert notifier.watchdog_interval() == 15.0
        assert notifier.watchdog()
        assert fake.receive()[0] == {"WATCHDOG": "1"}
    finally:
        notifier.close()
    assert fake.nothing_pending()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),  # inherited by a child
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "1000"}, 0.0005),
    ],
)
def test_watchdog_interval_is_half_the_timeout(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env) == expected
    with Notifier(env) as notifier:
        assert notifier.watchdog_interval() == expected
