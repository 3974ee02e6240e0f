"""WHATWG event-stream conformance: the web-platform-tests vectors through ``SseParser`` and ``encode_message``.

The data is ``../shared/testdata/sse-wpt-parse-vectors.json``: 26 vectors transcribed from the WPT
``eventsource/format-*`` tests as vendored in nodejs/node @ 698a391, BSD-3-Clause; see that folder's README.
Each vector is the exact body a WPT server sends and the ``MessageEvent``s (``type``, ``data``, ``lastEventId``)
a conforming client dispatches; a vector whose Content-Type a client must refuse expects no events at all.
The parser must give the same events whether the body arrives whole, one character at a time or one byte at a
time, and every expected event, encoded with ``encode_message``, must parse back to itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from aobd.api.sse import SseMessage, SseParser, encode_comment, encode_message, is_event_stream

TESTDATA = Path(__file__).resolve().parents[2].parent / "shared" / "testdata"
VECTORS_FILE = TESTDATA / "sse-wpt-parse-vectors.json"
# The count from the testdata README: a truncated file would otherwise just mean fewer tests.
VECTOR_COUNT = 26


def load_vectors() -> list[dict[str, Any]]:
    vectors: list[dict[str, Any]] = json.loads(VECTORS_FILE.read_text(encoding="utf-8"))["vectors"]
    return vectors


VECTORS = load_vectors()


def as_events(messages: list[SseMessage]) -> list[dict[str, str]]:
    """Messages in the vectors' shape (``MessageEvent`` fields)."""
    return [{"type": m.event, "data": m.data, "lastEventId": m.id} for m in messages]


def client_events(vector: dict[str, Any], chunks: list[str] | list[bytes]) -> list[dict[str, str]]:
    """What a conforming client dispatches: nothing when the Content-Type fails the connection."""
    if not is_event_stream(vector["content_type"]):
        return []
    parser = SseParser()
    messages: list[SseMessage] = []
    for chunk in chunks:
        messages += parser.feed_bytes(chunk) if isinstance(chunk, bytes) else parser.feed(chunk)
    parser.end_of_stream()
    return as_events(messages)


def test_vector_count() -> None:
    assert len(VECTORS) == VECTOR_COUNT


@pytest.mark.parametrize("vector", VECTORS, ids=[v["id"] for v in VECTORS])
def test_parse(vector: dict[str, Any]) -> None:
    assert client_events(vector, [vector["stream"]]) == vector["expected_events"]
    assert is_event_stream(vector["content_type"]) == (vector["expected_connection"] == "open")


@pytest.mark.parametrize("vector", VECTORS, ids=[v["id"] for v in VECTORS])
def test_parse_split_anywhere(vector: dict[str, Any]) -> None:
    # One character (and one byte) per chunk splits every CRLF pair, BOM and multi-byte UTF-8 sequence.
    stream: str = vector["stream"]
    assert client_events(vector, list(stream)) == vector["expected_events"]
    raw = stream.encode()
    assert client_events(vector, [raw[i : i + 1] for i in range(len(raw))]) == vector["expected_events"]


@pytest.mark.parametrize(
    "vector", [v for v in VECTORS if "expected_reconnection_time_ms" in v], ids=lambda v: str(v["id"])
)
def test_reconnection_time(vector: dict[str, Any]) -> None:
    parser = SseParser()
    parser.feed(vector["stream"])
    assert parser.retry == vector["expected_reconnection_time_ms"]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["id"] for v in VECTORS])
def test_encode_round_trip(vector: dict[str, Any]) -> None:
    expected: list[dict[str, str]] = vector["expected_events"]
    body = b""
    last_id = ""
    for event in expected:
        # An id field only where the last event ID changes, as a server would send it.
        event_id = event["lastEventId"] if event["lastEventId"] != last_id else None
        last_id = event["lastEventId"]
        event_type = None if event["type"] == "message" else event["type"]
        body += encode_message(event["data"], id=event_id, event=event_type) + encode_comment("heartbeat")
    parser = SseParser()
    assert as_events(parser.feed_bytes(body)) == expected


def test_event_id_and_name_injection_is_refused() -> None:
    for bad in ("a\nb", "a\rb", "a\r\nb", "\n"):
        with pytest.raises(ValueError, match="must not contain"):
            encode_message("x", id=bad)
        with pytest.raises(ValueError, match="must not contain"):
            encode_message("x", event=bad)
    with pytest.raises(ValueError, match="NUL"):
        encode_message("x", id="a\0b")
    with pytest.raises(ValueError, match="retry"):
        encode_message("x", retry=-1)


def test_multiline_data_and_retry_round_trip() -> None:
    body = encode_message(" lead\r\nmid\rend\n", id="7", event="progress", retry=1500)
    assert body == b"id: 7\nevent: progress\nretry: 1500\ndata:  lead\ndata: mid\ndata: end\ndata: \n\n"
    parser = SseParser()
    assert parser.feed_bytes(body) == [SseMessage(" lead\nmid\nend\n", "progress", "7", 1500)]
    assert parser.last_event_id == "7"


def test_incomplete_event_is_discarded_at_end_of_stream() -> None:
    parser = SseParser()
    assert parser.feed("id: 1\ndata: one\n\nid: 2\ndata: tw") == [SseMessage("one", id="1")]
    parser.end_of_stream()
    # The reconnection starts a new stream: nothing of the cut-off event leaks into it, the last id stays.
    assert parser.last_event_id == "1"
    assert parser.feed("o\n\ndata: three\n\n") == [SseMessage("three", id="1")]
