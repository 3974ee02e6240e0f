"""A zmq socket driven by the event loop through its descriptor: callbacks per message, no future per call.

pyzmq's asyncio sockets (``zmq.asyncio``) pay for generality on every call: a future, an event-mask update, a
``PollEvent`` enum operation or two, about 30-60 us per message on these machines against 2 us for the plain
``recv_multipart``. The planes' hot sockets (the fanout feed, the RPC channel, the job transport) carry a
message per run step, so that wrapper was a fifth of an accept worker's CPU (docs/performance.md).
:class:`LoopSocket` owns one plain :class:`zmq.Socket` and services it from the loop instead.

The one rule that makes this correct: zmq's ``ZMQ_FD`` is *edge*-triggered and shared by reads and writes, and
any operation on the socket (a send included) may consume the edge that announced waiting messages. So the
socket is serviced, meaning ``ZMQ_EVENTS`` read and every waiting message received, not only when the descriptor
turns readable but also after every send (scheduled with ``call_soon``, so a burst of sends costs one service).
Skipping that second half is what hung the daemon when the sends alone bypassed pyzmq (docs/performance.md).

A socket must be used by one :class:`LoopSocket` only, from the loop's thread.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import zmq
import zmq.backend

__all__ = ["LoopSocket"]

_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE) | _NOBLOCK
_EVENTS = int(zmq.EVENTS)
_RCVMORE = int(zmq.RCVMORE)

# The compiled socket's own methods, called with plain int flags. pyzmq's Python layer (``send_multipart``,
# ``recv_multipart``, ``Socket.send``) adds a frame per call and an ``enum.Flag`` operation per frame: half the
# cost of a two-frame message (3.6 against 1.8 us for a send and a receive, measured).
_send = zmq.backend.Socket.send
_recv = zmq.backend.Socket.recv
_get = zmq.backend.Socket.get


def _send_frames(socket: zmq.Socket[Any], frames: list[bytes]) -> None:
    """Send one message without blocking; raises zmq.Again when zmq cannot take it (a message is taken whole or
    not at all: the high-water mark is checked at its first frame)."""
    last = len(frames) - 1
    for frame in frames[:last]:
        _send(socket, frame, _MORE_NOBLOCK)
    _send(socket, frames[last], _NOBLOCK)


def _recv_frames(socket: zmq.Socket[Any]) -> list[bytes]:
    """Receive one waiting message, all its frames; raises zmq.Again when none is waiting."""
    frames = [_recv(socket, _NOBLOCK)]
    while _get(socket, _RCVMORE):
        frames.append(_recv(socket, _NOBLOCK))
    return frames


#: Messages handled per service before yielding to the loop's other callbacks (then serviced again at once).
BUDGET = 256


class LoopSocket:
    """Services ``socket`` on the running loop: each received message (its frames, as bytes) goes to ``on_message``;
    :meth:`send` sends without blocking and queues what zmq cannot take yet, in order.

    ``on_message`` runs on the loop and must not block; it may call :meth:`send`. An exception from it is passed
    to the loop's exception handler and the service goes on with the next message.
    """

    def __init__(self, socket: zmq.Socket[Any], on_message: Callable[[list[bytes]], object]) -> None:
        self.socket = socket
        self.on_message = on_message
        self._loop = asyncio.get_running_loop()
        self._fd = cast(int, socket.getsockopt(zmq.FD))
        self._outbox: deque[list[bytes]] = deque()
        self._scheduled = False
        self.closed = False
        self._loop.add_reader(self._fd, self._service)
        self._schedule()  # messages may have arrived before the reader was added; their edge is gone

    @property
    def queued(self) -> int:
        """Messages waiting for zmq to take them (a peer at its high-water mark, or not connected)."""
        return len(self._outbox)

    def send(self, frames: list[bytes]) -> bool:
        """Send now if zmq takes it, else queue it behind the others; True when it went to zmq at once."""
        if self.closed:
            raise zmq.ZMQError(zmq.ENOTSOCK, "the socket is closed")
        sent = False
        if not self._outbox:
            try:
                _send_frames(self.socket, frames)
                sent = True
            except zmq.Again:
                pass
        if not sent:
            self._outbox.append(frames)
        self._schedule()
        return sent

    def discard(self, frames: list[bytes]) -> bool:
        """Withdraw a queued message (its caller gave up); False when it was sent already."""
        try:
            self._outbox.remove(frames)
        except ValueError:
            return False
        return True

    def close(self, linger: int = 0) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self._fd)
        self._outbox.clear()
        self.socket.close(linger=linger)

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._service)

    def _service(self) -> None:
        self._scheduled = False
        if self.closed:
            return
        socket = self.socket
        handled = 0
        # Reading the events re-arms the descriptor's edge, so stop only when the events read after the last
        # operation show nothing to do: any send or receive may consume the edge of a message arriving meanwhile.
        events = cast(int, _get(socket, _EVENTS))
        while True:
            acted = False  # whether anything was sent or received: only then can there be more to do
            stale = False  # whether an operation ran since ``events`` was read
            if events & _POLLOUT and self._outbox and self._flush():
                acted = stale = True
            # POLLIN: a message can be received now. The events are read again after each message rather than
            # receiving until zmq.Again, whose exception costs more than the read (2.5 against 0.9 us).
            while events & _POLLIN:
                if handled == BUDGET:
                    self._schedule()  # more may be waiting: let the loop's other callbacks run first
                    return
                try:
                    frames = _recv_frames(socket)
                except zmq.Again:
                    acted = stale = True
                    break
                handled += 1
                acted = True
                try:
                    self.on_message(frames)
                except Exception as exc:  # one bad message must not stop the socket
                    self._loop.call_exception_handler(
                        {"message": "zmq message handler failed", "exception": exc, "socket": self}
                    )
                if self.closed:
                    return
                events = cast(int, _get(socket, _EVENTS))  # after the handler, which may have sent
                stale = False
            if not acted:
                return
            if stale:
                events = cast(int, _get(socket, _EVENTS))

    def _flush(self) -> bool:
        """Send queued messages while zmq takes them; True when at least one went."""
        outbox, socket = self._outbox, self.socket
        sent = False
        while outbox:
            try:
                _send_frames(socket, outbox[0])
            except zmq.Again:
                break
            outbox.popleft()
            sent = True
        return sent
