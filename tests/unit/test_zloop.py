"""LoopSocket: zmq sockets serviced from the event loop without losing a message to the descriptor's edge."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import zmq

from aobd.planes.zloop import BUDGET, LoopSocket


@pytest.fixture
def context() -> Any:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)  # closes what a failed test left open, so a failure cannot hang here


def _endpoint(tmp_path: Path, name: str) -> str:
    return f"ipc://{tmp_path}/{name}"


def _echo_server(context: Any, endpoint: str, suffix: bytes = b"") -> LoopSocket:
    """A ROUTER bound at ``endpoint`` answering every request from inside its handler: the body, plus ``suffix``."""
    router = context.socket(zmq.ROUTER)
    router.bind(endpoint)
    server: LoopSocket | None = None

    def answer(frames: list[bytes]) -> None:
        assert server is not None
        server.send([frames[0], frames[1] + suffix])

    server = LoopSocket(router, answer)
    return server


async def _until(predicate: Any, timeout_s: float = 10.0) -> None:
    """Poll: the conditions are counters bumped by the sockets' callbacks, which signal nothing of their own."""
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def test_messages_sent_before_the_socket_is_serviced_are_received(context: Any, tmp_path: Path) -> None:
    async def main() -> list[list[bytes]]:
        pull = context.socket(zmq.PULL)
        pull.bind(_endpoint(tmp_path, "early"))
        push = context.socket(zmq.PUSH)
        push.connect(_endpoint(tmp_path, "early"))
        for i in range(5):
            push.send_multipart([b"m", str(i).encode()])
        # Let them arrive and read EVENTS once, which consumes the descriptor's edge before the reader exists.
        await asyncio.sleep(0.1)
        pull.getsockopt(zmq.EVENTS)
        got: list[list[bytes]] = []
        loop_socket = LoopSocket(pull, got.append)
        await _until(lambda: len(got) == 5)
        loop_socket.close()
        push.close(linger=0)
        return got

    assert asyncio.run(main()) == [[b"m", str(i).encode()] for i in range(5)]


def test_a_request_reply_storm_with_sends_from_the_handlers_never_stalls(context: Any, tmp_path: Path) -> None:
    """Every reply is sent from inside the server's handler and every next request from inside the client's: the
    sends keep consuming the descriptor's edge while messages wait. 20,000 round trips, 64 in flight, must finish."""
    total, in_flight = 20_000, 64

    async def main() -> int:
        server = _echo_server(context, _endpoint(tmp_path, "storm"), suffix=b"!")
        dealer = context.socket(zmq.DEALER)
        dealer.connect(_endpoint(tmp_path, "storm"))
        sent = received = 0
        client: LoopSocket | None = None

        def on_reply(frames: list[bytes]) -> None:
            nonlocal sent, received
            assert frames[0].endswith(b"!")
            received += 1
            if sent < total:
                assert client is not None
                client.send([str(sent).encode()])
                sent += 1

        client = LoopSocket(dealer, on_reply)
        for _ in range(in_flight):
            client.send([str(sent).encode()])
            sent += 1
        await _until(lambda: received == total, timeout_s=60.0)
        client.close()
        server.close()
        return received

    assert asyncio.run(main()) == total


def test_sends_from_a_task_do_not_swallow_the_edge_of_waiting_replies(context: Any, tmp_path: Path) -> None:
    """The requests go out from a coroutine, outside the socket's service: each send may consume the edge that
    announced a reply. Without servicing after sends, the client waits forever for replies already queued."""
    total, window = 20_000, 64

    async def main() -> int:
        server = _echo_server(context, _endpoint(tmp_path, "edge"))
        received = 0
        room = asyncio.Event()

        def on_reply(frames: list[bytes]) -> None:
            nonlocal received
            received += 1
            room.set()

        client = LoopSocket(context.socket(zmq.DEALER), on_reply)
        client.socket.connect(_endpoint(tmp_path, "edge"))
        async with asyncio.timeout(20.0):
            for sent in range(total):
                while sent - received >= window:
                    room.clear()
                    await room.wait()
                client.send([str(sent).encode()])
                # What a send does whenever libzmq processes the socket's commands in it (now and then, too rarely
                # to hit on purpose): the descriptor's edge is consumed, though a reply may be waiting.
                client.socket.getsockopt(zmq.EVENTS)
                if sent % 8 == 0:
                    await asyncio.sleep(0)
            await _until(lambda: received == total)
        client.close()
        server.close()
        return received

    assert asyncio.run(main()) == total


def test_sends_wait_for_a_peer_in_order_and_a_withdrawn_one_never_goes(context: Any, tmp_path: Path) -> None:
    async def main() -> list[list[bytes]]:
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IMMEDIATE, 1)  # no peer: zmq refuses, the LoopSocket queues
        dealer.connect(_endpoint(tmp_path, "late"))
        client = LoopSocket(dealer, lambda frames: None)
        messages = [[f"m{i}".encode()] for i in range(4)]
        assert [client.send(m) for m in messages] == [False] * 4
        assert client.discard(messages[1]) is True
        assert client.queued == 3
        got: list[list[bytes]] = []
        router = context.socket(zmq.ROUTER)
        router.bind(_endpoint(tmp_path, "late"))
        server = LoopSocket(router, lambda frames: got.append(frames[1:]))
        await _until(lambda: len(got) == 3)
        assert client.queued == 0
        client.close()
        server.close()
        return got

    assert asyncio.run(main()) == [[b"m0"], [b"m2"], [b"m3"]]


def test_a_failing_handler_is_reported_and_the_next_messages_still_arrive(context: Any, tmp_path: Path) -> None:
    async def main() -> tuple[list[bytes], list[str]]:
        loop = asyncio.get_running_loop()
        reported: list[str] = []
        loop.set_exception_handler(lambda _loop, ctx: reported.append(str(ctx["exception"])))
        pull = context.socket(zmq.PULL)
        pull.bind(_endpoint(tmp_path, "bad"))
        push = context.socket(zmq.PUSH)
        push.connect(_endpoint(tmp_path, "bad"))
        got: list[bytes] = []

        def handle(frames: list[bytes]) -> None:
            if frames[0] == b"boom":
                raise ValueError("bad message")
            got.append(frames[0])

        loop_socket = LoopSocket(pull, handle)
        for body in (b"a", b"boom", b"b"):
            push.send(body)
        await _until(lambda: len(got) == 2)
        loop_socket.close()
        push.close(linger=0)
        return got, reported

    got, reported = asyncio.run(main())
    assert got == [b"a", b"b"]
    assert reported == ["bad message"]


def test_a_burst_larger_than_the_budget_is_received_whole_while_other_callbacks_run(
    context: Any, tmp_path: Path
) -> None:
    async def main() -> tuple[int, int]:
        pull = context.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVHWM, 0)
        pull.bind(_endpoint(tmp_path, "burst"))
        push = context.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 0)
        push.connect(_endpoint(tmp_path, "burst"))
        count = BUDGET * 10
        for i in range(count):
            push.send(str(i).encode())
        await asyncio.sleep(0.2)
        got: list[bytes] = []
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        loop_socket = LoopSocket(pull, lambda frames: got.append(frames[0]))
        await _until(lambda: len(got) == count)
        task.cancel()
        loop_socket.close()
        push.close(linger=0)
        assert got == [str(i).encode() for i in range(count)]
        return len(got), ticks

    received, ticks = asyncio.run(main())
    assert received == BUDGET * 10
    assert ticks >= 5  # the loop's other work ran between the slices of the burst


def test_a_closed_socket_refuses_sends(context: Any, tmp_path: Path) -> None:
    async def main() -> None:
        pull = context.socket(zmq.PULL)
        pull.bind(_endpoint(tmp_path, "closed"))
        loop_socket = LoopSocket(pull, lambda frames: None)
        loop_socket.close()
        loop_socket.close()  # twice is harmless
        with pytest.raises(zmq.ZMQError):
            loop_socket.send([b"x"])

    asyncio.run(main())
