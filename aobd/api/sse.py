"""Server-sent events: the encoder the API streams with and a WHATWG-exact parser for clients and tests.

The parser follows the "event stream interpretation" section of the HTML standard
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation) to the letter,
because ``aobctl`` and the tests must see exactly what a browser's ``EventSource`` would: the conformance suite
(``tests/conformance/test_sse_vectors.py``) runs it over the web-platform-tests vectors. It is sans-IO: feed it
text (or bytes) as it arrives and it returns the messages each chunk completed.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

__all__ = ["SseMessage", "SseParser", "encode_comment", "encode_message", "is_event_stream"]

# The standard's three line terminators; CRLF first so that it counts as one.
_LINE_END = re.compile(r"\r\n|\r|\n")
_BOM = "\ufeff"


@dataclass(frozen=True, slots=True)
class SseMessage:
    """One dispatched event, as ``EventSource`` would deliver it as a ``MessageEvent``.

    Attributes:
        data: The data lines joined with LF (the standard's data buffer without its final LF).
        event: The event type; ``"message"`` when the stream named none (or an empty one).
        id: The last event ID at dispatch (``MessageEvent.lastEventId``): it persists across events until the
            server sends another ``id``, so it is ``""`` only until the first one.
        retry: The reconnection time in milliseconds in effect at dispatch, ``None`` until the server sets one.
    """

    data: str
    event: str = "message"
    id: str = ""
    retry: int | None = None


def _check_field(name: str, value: str) -> None:
    # A CR or LF would end the field early and let the rest be read as further fields (header injection);
    # a NUL in an id makes every conforming client ignore the id, which would silently break resumption.
    if "\r" in value or "\n" in value or (name == "id" and "\0" in value):
        raise ValueError(f"SSE {name} {value!r} must not contain CR, LF{' or NUL' if name == 'id' else ''}")


def encode_message(data: str, *, id: str | None = None, event: str | None = None, retry: int | None = None) -> bytes:
    """Encode one event of a ``text/event-stream`` response.

    Args:
        data: The payload. Each line (split at CRLF, CR or LF) becomes one ``data:`` line, so a client gets the
            lines back joined with LF; a CR in ``data`` therefore arrives as LF, as the format cannot carry it.
        id: Sets the client's last event ID, which it sends back as ``Last-Event-ID`` when it reconnects.
            ``""`` resets it. ``None`` leaves it unchanged.
        event: The event type (``addEventListener`` name); ``None`` means the default, ``"message"``.
        retry: Reconnection time for the client, in milliseconds.

    Returns:
        The UTF-8 bytes of the message, ending with the blank line that dispatches it.

    Raises:
        ValueError: ``id`` or ``event`` contains CR or LF, ``id`` contains NUL, or ``retry`` is negative.
    """
    parts: list[str] = []
    if id is not None:
        _check_field("id", id)
        parts.append(f"id: {id}\n")
    if event is not None:
        _check_field("event", event)
        parts.append(f"event: {event}\n")
    if retry is not None:
        if isinstance(retry, bool) or not isinstance(retry, int) or retry < 0:
            raise ValueError(f"SSE retry must be a non-negative integer of milliseconds, not {retry!r}")
        parts.append(f"retry: {retry}\n")
    # One space after the colon always: the parser strips exactly one, so data starting with a space survives.
    parts.extend(f"data: {line}\n" for line in _LINE_END.split(data))
    parts.append("\n")
    return "".join(parts).encode()


def encode_comment(text: str = "") -> bytes:
    """Encode a comment: ignored by clients, it keeps idle connections (and proxies' timers) alive.

    Args:
        text: Free text; each of its lines becomes one comment line.

    Returns:
        The UTF-8 bytes of the comment lines. No blank line follows: a comment never dispatches anything.
    """
    return "".join(f": {line}\n" if line else ":\n" for line in _LINE_END.split(text)).encode()


def is_event_stream(content_type: str | None) -> bool:
    """Whether a response's ``Content-Type`` lets an ``EventSource`` read it (else the connection fails).

    Only the MIME type essence counts (``text/event-stream``, any case); parameters such as ``charset`` are
    ignored, since the stream is always UTF-8.
    """
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() == "text/event-stream"


class SseParser:
    """Incremental, spec-exact ``text/event-stream`` parser.

    Chunks may split lines, CRLF pairs and (with :meth:`feed_bytes`) UTF-8 sequences anywhere. An event is
    dispatched only by a blank line, so whatever follows the last blank line when the stream ends is discarded:
    call :meth:`end_of_stream` then, before reusing the parser for a reconnection.

    Attributes:
        last_event_id: The ID a client sends as ``Last-Event-ID`` when it reconnects.
        retry: The reconnection time (ms) the server asked for, ``None`` until it does.
    """

    def __init__(self) -> None:
        self.last_event_id = ""
        self.retry: int | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._start_stream()

    def _start_stream(self) -> None:
        # The standard associates these buffers with one stream, so a reconnection starts them afresh, while
        # last_event_id and retry belong to the EventSource and survive it. The id buffer starts from
        # last_event_id, as in Chromium, rather than from "": the server resumes after the id the client sent,
        # and reverting it to "" at the first id-less event would make the next reconnection replay everything.
        self._pending: list[str] = []
        self._skip_lf = False
        self._bom_possible = True
        self._data: list[str] = []
        self._event = ""
        self._id = self.last_event_id
        self._decoder.reset()

    def feed(self, text: str) -> list[SseMessage]:
        """Parse the next chunk of the stream.

        Args:
            text: Decoded text, in order, of any length.

        Returns:
            The messages that lines completed by this chunk dispatched, in order.
        """
        if not text:
            return []
        if self._skip_lf:
            # The previous chunk ended with CR: an LF now is the second half of that CRLF, not an empty line.
            self._skip_lf = False
            if text[0] == "\n":
                text = text[1:]
                if not text:
                    return []
        if self._bom_possible:
            self._bom_possible = False
            if text[0] == _BOM:
                text = text[1:]
        pieces = _LINE_END.split(text)
        if len(pieces) == 1:
            self._pending.append(text)
            return []
        self._skip_lf = text[-1] == "\r"
        first = "".join(self._pending) + pieces[0] if self._pending else pieces[0]
        self._pending = [pieces[-1]] if pieces[-1] else []
        messages: list[SseMessage] = []
        self._line(first, messages)
        for line in pieces[1:-1]:
            self._line(line, messages)
        return messages

    def feed_bytes(self, data: bytes) -> list[SseMessage]:
        """Like :meth:`feed` for raw body bytes, decoded as UTF-8 whatever the ``charset`` says (per the standard).

        Invalid sequences become U+FFFD; a sequence split across chunks is decoded once complete.
        """
        return self.feed(self._decoder.decode(data))

    def end_of_stream(self) -> None:
        """The connection ended: discard the incomplete event, keep ``last_event_id`` and ``retry``."""
        self._start_stream()

    def _line(self, line: str, out: list[SseMessage]) -> None:
        if not line:
            self._dispatch(out)
            return
        if line[0] == ":":
            return
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            # ASCII digits only: str.isdigit alone would also accept other scripts' digits and superscripts.
            self.retry = int(value)
        # Any other field name is ignored, as the standard requires.

    def _dispatch(self, out: list[SseMessage]) -> None:
        # The last event ID is committed even when no data follows, so an id-only block still moves it.
        self.last_event_id = self._id
        if self._data:
            out.append(SseMessage("\n".join(self._data), self._event or "message", self.last_event_id, self.retry))
        self._data = []
        self._event = ""
