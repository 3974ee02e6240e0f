"""The SSRF guard: which URLs ``http`` nodes (and patches adding them) may reach, and connection pinning.

Three layers, from pure to I/O:

* :func:`judge_address` is a pure function of one IP address against an explicit deny-list of networks. IPv6
  forms that carry an IPv4 address (IPv4-mapped ``::ffff:0:0/96``, IPv4-translated ``::ffff:0:0:0/96``,
  IPv4-compatible ``::/96``, NAT64 ``64:ff9b::/96`` and ``64:ff9b:1::/48``, 6to4 ``2002::/16``) are mapped
  back to IPv4 first, because ``ipaddress`` alone gets them wrong (``::ffff:127.0.0.1`` is not
  ``is_loopback``, ``64:ff9b::7f00:1`` is ``is_global``).
* :func:`static_check_url` needs no I/O, for patch validation: it refuses malformed URLs, literal addresses
  in denied ranges and well-known internal names (``localhost``, ``*.internal``, ``metadata``...). Names
  that need DNS pass here; :meth:`UrlGuard.check_urls` resolves them, and the runtime check is always
  repeated.
* :class:`UrlGuard` resolves a URL's host, judges *every* address it resolves to and returns a
  :class:`Target` carrying those addresses. :class:`PinnedResolver`, installed in the aiohttp connector,
  answers only with the addresses of the target pinned by :func:`pin_target`, so the socket goes to an
  address that was judged: there is no second DNS lookup for a rebinding server to answer differently.

Decisions a caller depends on:

* Only ``http`` and ``https``. A URL is *malformed* (reason ``"malformed"``) when it has whitespace, control
  characters or a backslash anywhere (parsers disagree on them: ``http://a\\@b/`` is host ``a`` to a browser
  and ``b`` to others), no host, a bad or zero port, empty DNS labels, an IPv6 zone id, or a host that ends
  in a number without being a valid IPv4 address (``425.510.425.510``, ``0o177.0.0.1``, ``7147006462``).
* Credentials in the userinfo (``http://user:pass@host/``) are **refused, not stripped**: stripping would
  send a request the author did not write, and accepting them would copy secrets into workflow documents and
  events. Put credentials in ``config.headers``.
* Legacy numeric IPv4 hosts (``127.1``, ``2130706433``, ``0x7f000001``, ``0177.0.0.1``) are parsed like the
  WHATWG URL standard and ``inet_aton`` do, judged as the address they denote, and the URL's host is
  rewritten to the dotted form, so what is judged is what the HTTP client connects to.
* ``localhost`` and ``*.localhost`` always mean loopback (RFC 6761) and are judged as ``127.0.0.1`` and
  ``::1`` without asking DNS (``ip6-localhost`` and ``ip6-loopback`` as ``::1``). Other well-known internal
  names are refused by name unless a name entry allows them.
* Allow-list entries (``security.http_allow``): ``"host:port"``, ``"host"`` (any port), ``"[v6]:port"``,
  ``"*.example.com"`` or a CIDR such as ``"127.0.0.0/8"`` (any port). A name entry accepts whatever that
  exact name resolves to; an address or CIDR entry accepts a denied address (or the IPv4 address embedded in
  it) that it contains, whatever name led there.
* A name that does not resolve raises :class:`UnresolvableHost` (a :class:`~aobd.errors.SsrfDenied` with its
  own code), which an executor may treat as retryable.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeAlias

from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from aobd.errors import ConfigError, SsrfDenied

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
#: ``await resolver(host, port)`` returns the host's addresses as strings, like ``getaddrinfo`` would.
Resolver: TypeAlias = Callable[[str, int], Awaitable[list[str]]]

__all__ = [
    "DEFAULT_DENIED_NAMES",
    "TEMPLATE_PLACEHOLDER",
    "AddressVerdict",
    "AllowEntry",
    "AllowList",
    "PinnedResolver",
    "Target",
    "UnresolvableHost",
    "UrlGuard",
    "default_resolver",
    "judge_address",
    "parse_ipv4_host",
    "pin_target",
    "resolve_redirect",
    "static_check_url",
]

ALLOW_KEY = "security.http_allow"
ALLOWED_SCHEMES = ("http", "https")
MAX_URL_LENGTH = 8192

#: ``{name}`` placeholders of ``http`` node URLs; the checks below know that such a URL is a template.
TEMPLATE_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

# Most specific first: the first match names the rule in the error message.
_V4_DENY: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(net), reason)
    for net, reason in (
        ("169.254.169.254/32", "metadata"),  # AWS, GCP, Azure, DigitalOcean, OpenStack
        ("169.254.170.2/32", "metadata"),  # AWS ECS task credentials
        ("100.100.100.200/32", "metadata"),  # Alibaba Cloud
        ("192.0.0.192/32", "metadata"),  # Oracle Cloud
        ("255.255.255.255/32", "broadcast"),
        ("0.0.0.0/8", "unspecified"),  # "this network"; 0.0.0.0 reaches the local host on Linux
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "cgnat"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link_local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "ietf_protocol"),  # ipaddress calls 192.0.0.192 global; it is not
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "reserved"),  # deprecated 6to4 relay anycast
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmark"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
    )
)

_V6_DENY: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(net), reason)
    for net, reason in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("fd00:ec2::254/128", "metadata"),  # AWS IMDS over IPv6
        ("fc00::/7", "private"),  # unique local
        ("fe80::/10", "link_local"),
        ("fec0::/10", "site_local"),
        ("ff00::/8", "multicast"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
        ("2001::/23", "ietf_protocol"),  # Teredo, benchmarking, ORCHID: none is a plain destination
        ("5f00::/16", "reserved"),  # SRv6 SIDs
    )
)
# Everything outside global unicast (2000::/3) that no rule above names is reserved, once the prefixes that
# embed IPv4 have been mapped back.
_V6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")

_REASON_TEXT = {
    "metadata": "a cloud metadata endpoint",
    "broadcast": "broadcast",
    "unspecified": "unspecified",
    "private": "private",
    "cgnat": "carrier-grade NAT shared space",
    "loopback": "loopback",
    "link_local": "link-local",
    "ietf_protocol": "an IETF protocol assignment",
    "documentation": "a documentation range",
    "reserved": "reserved",
    "benchmark": "a benchmarking range",
    "multicast": "multicast",
    "site_local": "site-local (deprecated)",
    "nat64": "a local-use NAT64 address whose embedded IPv4 address cannot be located",
}

#: Names refused without asking DNS ("*." matches any subdomain). The loopback names among them are judged as
#: 127.0.0.1 and ::1, so an address allow entry such as ``127.0.0.0/8`` admits them.
DEFAULT_DENIED_NAMES: tuple[str, ...] = (
    "localhost",
    "*.localhost",
    "localhost.localdomain",
    "ip6-localhost",
    "ip6-loopback",
    "*.localdomain",
    "*.local",  # mDNS and Kubernetes cluster.local
    "*.internal",  # metadata.google.internal, *.ec2.internal, and the TLD reserved for private use
    "*.home.arpa",
    "metadata",
    "instance-data",
    "kubernetes.default",
    "kubernetes.default.svc",
)
# What the loopback names mean, whatever a resolver or /etc/hosts says.
_LOOPBACK_NAMES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("localhost", ("127.0.0.1", "::1")),
    ("*.localhost", ("127.0.0.1", "::1")),
    ("localhost.localdomain", ("127.0.0.1", "::1")),
    ("ip6-localhost", ("::1",)),
    ("ip6-loopback", ("::1",)),
)

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


# ------------------------------------------------------------------------------------------------- addresses


@dataclass(frozen=True, slots=True)
class AddressVerdict:
    """What :func:`judge_address` decided about one address."""

    #: The address as judged (compressed form).
    address: str
    #: ``None`` when the address may be reached; else a code: ``loopback``, ``private``,
    #: ``link_local``, ``metadata``, ``cgnat``, ``unspecified``, ``multicast``, ``reserved``, ``broadcast``,
    #: ``documentation``, ``benchmark``, ``ietf_protocol``, ``site_local`` or ``nat64``.
    reason: str | None
    #: The deny-list network that matched, e.g. ``"127.0.0.0/8"``.
    network: str | None = None
    #: The IPv4 address embedded in an IPv6 one, which is what was judged.
    embedded: str | None = None
    #: How it was embedded: ``IPv4-mapped``, ``IPv4-translated``, ``IPv4-compatible``, ``NAT64``, ``6to4``.
    embedding: str | None = None

    @property
    def denied(self) -> bool:
        return self.reason is not None

    def describe(self) -> str:
        """``"::ffff:7f00:1 (IPv4-mapped 127.0.0.1), which is loopback (127.0.0.0/8)"``."""
        text = self.address
        if self.embedded is not None:
            text += f" ({self.embedding} {self.embedded})"
        if self.reason is None:
            return f"{text}, a public address"
        where = f" ({self.network})" if self.network else ""
        return f"{text}, which is {_REASON_TEXT[self.reason]}{where}"


def _ip(value: str | IPAddress) -> IPAddress:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    return ipaddress.ip_address(value)


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    """The IPv4 address an IPv6 address stands for, when its prefix says it carries one."""
    value = int(addr)
    high = value >> 32
    low = ipaddress.IPv4Address(value & 0xFFFF_FFFF)
    if high == 0xFFFF:
        return low, "IPv4-mapped"
    if high == 0xFFFF_0000:
        return low, "IPv4-translated"
    if high == 0 and value > 1:  # :: and ::1 are judged as themselves
        return low, "IPv4-compatible"
    if high == 0x0064_FF9B_0000_0000_0000_0000:
        return low, "NAT64"
    if value >> 80 == 0x0064_FF9B_0001 and high & 0xFFFF_FFFF_FFFF == 0:
        # Local-use NAT64 (RFC 8215) in the /96 form DNS64 deployments use.
        return low, "NAT64"
    if value >> 112 == 0x2002:
        return ipaddress.IPv4Address((value >> 80) & 0xFFFF_FFFF), "6to4"
    return None


def _judge_v4(addr: ipaddress.IPv4Address) -> tuple[str, str] | None:
    for net, reason in _V4_DENY:
        if addr in net:
            return reason, str(net)
    return None


def judge_address(ip: str | IPAddress) -> AddressVerdict:
    """Judge one address against the deny-list; pure, no I/O.

    Args:
        ip: an IPv4 or IPv6 address (a string in standard notation, or an ``ipaddress`` object). IPv6 zone ids
            (``fe80::1%eth0``) are accepted and ignored.

    Returns:
        The verdict; ``verdict.denied`` tells whether it is refused, ``verdict.reason`` why. Allow-lists are
        applied by callers (:class:`AllowList`), not here.

    Raises:
        ValueError: ``ip`` is not an IP address.
    """
    addr = _ip(ip)
    shown = str(addr)
    if isinstance(addr, ipaddress.IPv4Address):
        hit = _judge_v4(addr)
        return AddressVerdict(shown, *hit) if hit else AddressVerdict(shown, None)
    bare = ipaddress.IPv6Address(int(addr))  # drops a zone id, which the networks below cannot match
    embedded = _embedded_ipv4(bare)
    if embedded is not None:
        v4, how = embedded
        hit = _judge_v4(v4)
        if hit:
            return AddressVerdict(shown, hit[0], hit[1], str(v4), how)
        return AddressVerdict(shown, None, None, str(v4), how)
    if int(bare) >> 80 == 0x0064_FF9B_0001:
        return AddressVerdict(shown, "nat64", "64:ff9b:1::/48")
    for net, reason in _V6_DENY:
        if bare in net:
            return AddressVerdict(shown, reason, str(net))
    if bare not in _V6_GLOBAL_UNICAST:
        return AddressVerdict(shown, "reserved", "outside 2000::/3")
    return AddressVerdict(shown, None)


def _ipv4_number(part: str) -> int | None:
    """One part of a WHATWG/inet_aton IPv4 host: decimal, ``0x`` hex or ``0``-prefixed octal."""
    if not part:
        return None
    radix, digits = 10, part
    if part[:2] in ("0x", "0X"):
        radix, digits = 16, part[2:]
    elif len(part) > 1 and part[0] == "0":
        radix, digits = 8, part[1:]
    if not digits:
        return 0
    allowed = {10: "0123456789", 8: "01234567", 16: "0123456789abcdefABCDEF"}[radix]
    if any(ch not in allowed for ch in digits):
        return None
    return int(digits, radix)


def parse_ipv4_host(host: str) -> ipaddress.IPv4Address | None:
    """Parse a URL host the way browsers and ``inet_aton`` do (``127.1``, ``0x7f000001``, ``0177.0.0.1``).

    Returns:
        The address, or ``None`` when the host is a domain name (its last label is not a number).

    Raises:
        ValueError: the host ends in a number but is not a valid IPv4 address (``1.2.3.4.5``, ``0o177.0.0.1``,
            ``425.510.425.510``, ``7147006462``): the WHATWG URL standard calls that a failure, and resolvers
            disagree on what it means.
    """
    labels = host.split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()
    last = labels[-1]
    ends_in_number = (last.isascii() and last.isdigit()) or (
        last[:2] in ("0x", "0X") and _ipv4_number(last) is not None
    )
    if not ends_in_number:
        return None
    if len(labels) > 4:
        raise ValueError(f"{host!r} has more than four numeric parts")
    numbers = [_ipv4_number(label) for label in labels]
    if any(n is None for n in numbers):
        raise ValueError(f"{host!r} ends in a number but is not an IPv4 address")
    parts = [n for n in numbers if n is not None]
    if any(n > 255 for n in parts[:-1]) or parts[-1] >= 256 ** (5 - len(parts)):
        raise ValueError(f"{host!r} has an IPv4 part out of range")
    value = parts[-1]
    for index, number in enumerate(parts[:-1]):
        value += number << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


# ------------------------------------------------------------------------------------------------ allow-list


def _normalize_name(name: str) -> str:
    """Lower-case ASCII (IDNA) form without the trailing dot, as names are compared."""
    return name.rstrip(".").lower()


def _name_pattern(text: str) -> str:
    """Normalize a configured name or ``*.suffix`` pattern the way URL hosts are (IDNA, lower case).

    Raises:
        ValueError: it is not a DNS name.
    """
    wildcard = text.startswith("*.")
    bare = text[2:] if wildcard else text
    normalized = _normalize_name(URL.build(scheme="http", host=bare).raw_host or "")
    if not normalized or not all(_LABEL.match(label) for label in normalized.split(".")):
        raise ValueError("not a host name")
    if parse_ipv4_host(normalized) is not None:
        raise ValueError("write IPv4 addresses in dotted-decimal form")
    return ("*." if wildcard else "") + normalized


def _name_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])
    return name == pattern


@dataclass(frozen=True, slots=True)
class AllowEntry:
    """One parsed ``security.http_allow`` entry."""

    #: The entry as configured (stripped), for messages and logs.
    text: str
    #: Address or CIDR entries: the network that is allowed.
    network: IPNetwork | None = None
    #: Name entries: the normalized name, or ``*.suffix`` (which matches subdomains, not the suffix itself).
    name: str | None = None
    #: The only port allowed; ``None`` for any port.
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> AllowEntry:
        """Parse ``host:port``, ``host``, ``[v6]:port``, ``*.example.com`` or a CIDR.

        Raises:
            ConfigError: naming the key and the entry.
        """
        entry = text.strip()
        try:
            if "/" in entry:
                return cls(entry, network=ipaddress.ip_network(entry, strict=False))
            host, port = entry, None
            if entry.startswith("["):
                host, sep, rest = entry[1:].partition("]")
                if not sep or (rest and not rest.startswith(":")):
                    raise ValueError("expected [v6addr] or [v6addr]:port")
                port = _parse_port(rest[1:]) if rest else None
            elif entry.count(":") == 1:
                host, port_text = entry.split(":")
                port = _parse_port(port_text)
            try:
                addr = ipaddress.ip_address(host)
            except ValueError:
                addr = None
            if addr is not None:
                return cls(entry, network=ipaddress.ip_network(addr), port=port)
            return cls(entry, name=_name_pattern(host), port=port)
        except (ValueError, UnicodeError) as exc:
            raise ConfigError(
                f"{ALLOW_KEY}: entry {text!r} is not valid ({exc}); expected host:port, host, [v6addr]:port, "
                f"*.domain or a CIDR such as 10.0.0.0/8",
                details=[{"key": ALLOW_KEY, "entry": text}],
            ) from exc

    def allows_name(self, name: str, port: int) -> bool:
        return self.name is not None and _name_matches(self.name, name) and self.port in (None, port)

    def allows_address(self, verdict: AddressVerdict, port: int) -> bool:
        if self.network is None or self.port not in (None, port):
            return False
        candidates = [ipaddress.ip_address(verdict.address.split("%")[0])]
        if verdict.embedded is not None:
            candidates.append(ipaddress.ip_address(verdict.embedded))
        return any(candidate in self.network for candidate in candidates)


def _parse_port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"port {text!r} is not in 1-65535")
    return int(text)


class AllowList:
    """The parsed ``security.http_allow`` entries plus the names refused without DNS."""

    __slots__ = ("denied_names", "entries")

    def __init__(self, entries: Iterable[str] | str = (), *, deny_names: Iterable[str] = ()) -> None:
        """Parse ``entries`` (a comma-separated string is split, as ``AOBD_HTTP_ALLOW`` is).

        Args:
            entries: allow-list entries; see :meth:`AllowEntry.parse`.
            deny_names: names refused in addition to :data:`DEFAULT_DENIED_NAMES` (``*.suffix`` allowed).

        Raises:
            ConfigError: an entry or a denied name does not parse.
        """
        if isinstance(entries, str):
            entries = entries.split(",")
        self.entries: tuple[AllowEntry, ...] = tuple(AllowEntry.parse(e) for e in entries if e.strip())
        extra: list[str] = []
        for name in deny_names:
            try:
                extra.append(_name_pattern(name.strip()))
            except (ValueError, UnicodeError) as exc:
                raise ConfigError(f"denied host name {name!r} is not valid ({exc})") from exc
        self.denied_names: tuple[str, ...] = DEFAULT_DENIED_NAMES + tuple(extra)

    def name_entry(self, name: str, port: int) -> AllowEntry | None:
        return next((e for e in self.entries if e.allows_name(name, port)), None)

    def address_entry(self, verdict: AddressVerdict, port: int) -> AllowEntry | None:
        return next((e for e in self.entries if e.allows_address(verdict, port)), None)

    def denied_name(self, name: str) -> str | None:
        """The deny-list pattern ``name`` matches, if any."""
        return next((p for p in self.denied_names if _name_matches(p, name)), None)


# ----------------------------------------------------------------------------------------------- URL parsing


@dataclass(frozen=True, slots=True)
class Target:
    """A URL the guard accepted, and the addresses a connection to it must use."""

    #: The URL to request: the accepted one, with a legacy numeric IPv4 host rewritten to dotted form.
    url: URL
    #: ``url.raw_host``: what the HTTP client will hand the resolver.
    host: str
    port: int
    #: Every address the host resolved to, each judged; the connection is pinned to these.
    addresses: tuple[str, ...]
    #: The allow-list entries that matched (a name entry, or those admitting a denied address), for logs.
    allowed_by: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Parsed:
    raw: str
    url: URL
    host: str
    port: int
    ip: IPAddress | None
    #: Normalized DNS name (no trailing dot); ``None`` for IP literals.
    name: str | None = None


def _show(url: str) -> str:
    shown = url if url.isprintable() else repr(url)
    return shown if len(shown) <= 200 else shown[:197] + "..."


def _malformed(raw: str, why: str) -> SsrfDenied:
    message = f"{_show(raw)} is not an acceptable URL: {why}"
    return SsrfDenied(message, details=[{"url": raw, "reason": "malformed", "message": message}])


def _bad_char(text: str) -> str | None:
    return next((ch for ch in text if ch.isspace() or not ch.isprintable() or ch == "\\"), None)


def _precheck(raw: object, shown: str | None = None) -> str:
    if not isinstance(raw, str):
        raise _malformed(repr(raw), f"expected a string, got {type(raw).__name__}")
    shown = shown or raw
    if len(raw) > MAX_URL_LENGTH:
        raise _malformed(shown, f"longer than {MAX_URL_LENGTH} characters")
    bad = _bad_char(raw)
    if bad is not None:
        raise _malformed(shown, f"it contains {bad!r}, which URL parsers disagree on; percent-encode it")
    match = _SCHEME.match(raw)
    scheme = match.group(1).lower() if match else ""
    if scheme not in ALLOWED_SCHEMES:
        what = f"scheme {scheme!r}" if scheme else "no scheme"
        raise _malformed(shown, f"{what} is not supported; use http:// or https://")
    if not raw[len(scheme) + 1 :].startswith("//"):
        raise _malformed(shown, f"expected {scheme}:// followed by a host")
    return raw


def _parse_url(raw: object, shown: str | None = None) -> _Parsed:
    """Parse and normalize; every refusal is ``SsrfDenied`` with reason ``malformed``.

    ``shown`` is what messages call the URL (the template a probe URL was made from).
    """
    text = _precheck(raw, shown)
    shown = shown or text
    try:
        url = URL(text)
    except (ValueError, UnicodeError) as exc:
        raise _malformed(shown, str(exc)) from exc
    if url.raw_user is not None or url.raw_password is not None:
        raise _malformed(shown, "credentials in the URL are not accepted; send them in config.headers")
    host = url.raw_host
    if not host:
        raise _malformed(shown, "it has no host")
    if url.explicit_port == 0:
        raise _malformed(shown, "port 0 is not a destination")
    port = url.port
    assert port is not None  # http and https have default ports
    if ":" in host:
        if "%" in host:
            raise _malformed(shown, "IPv6 zone identifiers are not accepted")
        return _Parsed(shown, url, host, port, ipaddress.IPv6Address(host))
    try:
        v4 = parse_ipv4_host(host)
    except ValueError as exc:
        raise _malformed(shown, str(exc)) from exc
    if v4 is not None:
        if str(v4) != host:
            url = url.with_host(str(v4))
        return _Parsed(shown, url, str(v4), port, v4)
    name = _normalize_name(host)
    if len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise _malformed(shown, f"host {host!r} is not a valid DNS name")
    return _Parsed(shown, url, host, port, None, name)


def _parse_template(url: object) -> _Parsed | None:
    """Parse a URL or ``http`` node URL template; ``None`` when the host or port is a placeholder.

    Placeholders elsewhere are checked as if filled (with ``x``): they cannot change the destination, because
    the executor percent-encodes every filled value.
    """
    if not isinstance(url, str) or not TEMPLATE_PLACEHOLDER.search(url):
        return _parse_url(url)
    rest = url.split("://", 1)[1] if "://" in url else url
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if TEMPLATE_PLACEHOLDER.search(authority):
        _precheck(url)
        return None
    return _parse_url(TEMPLATE_PLACEHOLDER.sub("x", url), shown=url)


# -------------------------------------------------------------------------------------------------- deciding


def _suggestion(parsed: _Parsed, address: str | None = None) -> str:
    host = address or parsed.name or parsed.host
    if ":" in host:
        host = f"[{host.split('%')[0]}]"
    return f'allow it with {ALLOW_KEY} (for example "{host}:{parsed.port}")'


def _judge(parsed: _Parsed, addresses: Sequence[str], verb: str, allow: AllowList) -> Target:
    """Judge every address of one URL; pure. ``verb`` is ``"targets"`` or ``"resolves to"``."""
    unique = tuple(dict.fromkeys(addresses))
    by_name = allow.name_entry(parsed.name, parsed.port) if parsed.name else None
    allowed_by: list[str] = [by_name.text] if by_name else []
    denials: list[dict[str, Any]] = []
    for address in unique:
        try:
            verdict = judge_address(address)
        except ValueError:
            message = f"{_show(parsed.raw)} resolves to {address!r}, which is not an IP address"
            denials.append(
                {"url": parsed.raw, "host": parsed.host, "address": address, "reason": "unresolvable"}
                | {"message": message}
            )
            continue
        if not verdict.denied or by_name:
            continue
        entry = allow.address_entry(verdict, parsed.port)
        if entry is not None:
            allowed_by.append(entry.text)
            continue
        message = f"{_show(parsed.raw)} {verb} {verdict.describe()}; {_suggestion(parsed, address)}"
        denials.append(
            {
                "url": parsed.raw,
                "host": parsed.host,
                "address": verdict.address,
                "reason": verdict.reason,
                "network": verdict.network,
                "message": message,
            }
        )
    if denials:
        message = denials[0]["message"]
        if len(denials) > 1:
            message += f" (and {len(denials) - 1} more denied address(es))"
        raise SsrfDenied(message, details=denials)
    return Target(parsed.url, parsed.host, parsed.port, unique, tuple(dict.fromkeys(allowed_by)))


def _judge_without_dns(parsed: _Parsed, allow: AllowList) -> Target | None:
    """The verdict that needs no DNS, or ``None`` when the host must be resolved first."""
    if parsed.ip is not None:
        return _judge(parsed, [str(parsed.ip)], "targets", allow)
    assert parsed.name is not None
    loopback = next((addrs for p, addrs in _LOOPBACK_NAMES if _name_matches(p, parsed.name)), None)
    if loopback is not None:
        return _judge(parsed, loopback, "(a loopback name) resolves to", allow)
    pattern = allow.denied_name(parsed.name)
    if pattern is not None and allow.name_entry(parsed.name, parsed.port) is None:
        message = (
            f"{_show(parsed.raw)} names {parsed.name}, an internal host name (denied by {pattern!r}); "
            f"{_suggestion(parsed)}"
        )
        detail = {"url": parsed.raw, "host": parsed.host, "reason": "denied_name", "pattern": pattern}
        raise SsrfDenied(message, details=[{**detail, "message": message}])
    return None


def _reasons(exc: SsrfDenied) -> list[str]:
    return [str(d.get("message", exc.message)) for d in exc.details] or [exc.message]


def static_check_url(url: str, allow: AllowList | Sequence[str] = ()) -> list[str]:
    """Refusal reasons for ``url`` that need no I/O (for patch validation); empty when nothing is wrong yet.

    Catches malformed URLs, literal addresses in denied ranges and denied names. A name that needs DNS passes
    here: :meth:`UrlGuard.check_urls` resolves it, and the runtime check is repeated on every request anyway.
    ``{name}`` placeholders of ``http`` node templates are accepted: in the path and query they are checked
    as if filled, and when the host or port is templated only the scheme and characters are checked.

    Args:
        url: an absolute URL or ``http`` node URL template.
        allow: an :class:`AllowList` or the ``security.http_allow`` entries.
    """
    policy = allow if isinstance(allow, AllowList) else AllowList(allow)
    try:
        parsed = _parse_template(url)
        if parsed is not None:
            _judge_without_dns(parsed, policy)
    except SsrfDenied as exc:
        return _reasons(exc)
    return []


# ------------------------------------------------------------------------------------------------- resolving


class UnresolvableHost(SsrfDenied):
    """The host did not resolve, so it could not be judged (may be transient)."""

    code = "host_unresolvable"


async def default_resolver(host: str, port: int) -> list[str]:
    """Resolve with the running loop's ``getaddrinfo`` (TCP), de-duplicated in answer order."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class UrlGuard:
    """Decides whether a URL may be requested, and which addresses the request may connect to.

    Example::

        guard = UrlGuard(allow=["127.0.0.1:8080"])
        target = await guard.check_url("http://127.0.0.1:8080/x")  # raises SsrfDenied when refused
        with pin_target(target):
            await session.get(target.url)  # session's connector uses PinnedResolver
    """

    def __init__(
        self,
        allow: Sequence[str] | AllowList = (),
        *,
        resolver: Resolver | None = None,
        deny_names: Sequence[str] = (),
    ) -> None:
        """Args:
        allow: ``security.http_allow`` entries (see :meth:`AllowEntry.parse`) or a parsed :class:`AllowList`.
        resolver: ``await resolver(host, port) -> [address, ...]``; :func:`default_resolver` when omitted.
        deny_names: host names refused in addition to :data:`DEFAULT_DENIED_NAMES` (``*.suffix`` allowed);
            ignored when ``allow`` is an :class:`AllowList`, which carries its own.

        Raises:
            ConfigError: an allow entry does not parse.
        """
        self.allow = allow if isinstance(allow, AllowList) else AllowList(allow, deny_names=deny_names)
        self._resolver: Resolver = resolver or default_resolver

    async def check_url(self, url: str | URL) -> Target:
        """Resolve ``url``'s host and judge every address it resolves to.

        Returns:
            The target, whose ``addresses`` the connection must be pinned to (:func:`pin_target`).

        Raises:
            SsrfDenied: the URL is malformed (``details[0]["reason"] == "malformed"``), names a denied
                host, or resolves to at least one denied address that no allow entry admits. The message names
                the URL, the host, the address and the rule.
            UnresolvableHost: the name did not resolve.
        """
        return await self._check_parsed(_parse_url(str(url) if isinstance(url, URL) else url))

    async def _check_parsed(self, parsed: _Parsed) -> Target:
        target = _judge_without_dns(parsed, self.allow)
        if target is not None:
            return target
        assert parsed.name is not None
        try:
            addresses = await self._resolver(parsed.name, parsed.port)
        except OSError as exc:
            raise self._unresolvable(parsed, str(exc)) from exc
        if not addresses:
            raise self._unresolvable(parsed, "no addresses")
        return _judge(parsed, addresses, "resolves to", self.allow)

    @staticmethod
    def _unresolvable(parsed: _Parsed, why: str) -> UnresolvableHost:
        message = f"{_show(parsed.raw)}: host {parsed.name} did not resolve ({why}), so it cannot be judged"
        detail = {"url": parsed.raw, "host": parsed.host, "reason": "unresolvable", "message": message}
        return UnresolvableHost(message, details=[detail])

    def static_check(self, url: str) -> list[str]:
        """:func:`static_check_url` with this guard's allow-list."""
        return static_check_url(url, self.allow)

    async def check_urls(self, urls: Iterable[str]) -> dict[str, list[str]]:
        """Reasons to refuse each URL (an empty list when it passes), resolving names; for patch validation.

        The engine's driver calls this before handing the verdicts to the pure patch validator. URL templates
        are handled as in :func:`static_check_url`; a template whose host is a placeholder is only checked
        statically. A name that does not resolve gets a reason too, since it could not be judged.
        """
        unique = list(dict.fromkeys(urls))
        results = await asyncio.gather(*(self._reasons_for(url) for url in unique))
        return dict(zip(unique, results))

    async def _reasons_for(self, url: str) -> list[str]:
        try:
            parsed = _parse_template(url)
            if parsed is not None:
                await self._check_parsed(parsed)
        except SsrfDenied as exc:
            return _reasons(exc)
        return []


def resolve_redirect(base: URL, location: str) -> str:
    """The absolute URL a redirect's ``Location`` leads to from ``base``, to be checked like any other.

    Raises:
        SsrfDenied: reason ``malformed``, when ``location`` is empty or has characters parsers disagree on.
    """
    bad = _bad_char(location)
    if bad is not None or not location:
        why = f"it contains {bad!r}" if bad else "it is empty"
        raise _malformed(location, f"redirect Location {why}")
    try:
        return str(base.join(URL(location)))
    except (ValueError, UnicodeError) as exc:
        raise _malformed(location, f"redirect Location does not parse: {exc}") from exc


# --------------------------------------------------------------------------------------------------- pinning

_PINNED: ContextVar[Target | None] = ContextVar("aobd_ssrf_pinned_target", default=None)


@contextmanager
def pin_target(target: Target) -> Iterator[Target]:
    """Within this block (this task and tasks it starts), :class:`PinnedResolver` answers for ``target``."""
    token = _PINNED.set(target)
    try:
        yield target
    finally:
        _PINNED.reset(token)


class PinnedResolver(AbstractResolver):
    """An aiohttp resolver that answers only with the addresses the guard judged for the pinned target.

    Install it in the connector with the DNS cache off (``TCPConnector(resolver=PinnedResolver(),
    use_dns_cache=False)``) and make each request inside :func:`pin_target`. Any other host, or a request made
    without a pinned target, fails to resolve: the client cannot reach an address that was not judged, and no
    second DNS lookup happens between the check and the connect (no TOCTOU, no DNS rebinding). aiohttp
    connects to IP-literal hosts without asking a resolver; those are the literal the guard judged.
    """

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        target = _PINNED.get()
        if target is None or host.rstrip(".") != target.host.rstrip("."):
            raise OSError(f"refusing to resolve {host!r}: the SSRF guard judged no address for it")
        results: list[ResolveResult] = []
        for address in target.addresses:
            ip = ipaddress.ip_address(address.split("%")[0])
            ip_family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            if family in (socket.AF_INET, socket.AF_INET6) and family != ip_family:
                continue
            results.append(
                ResolveResult(
                    hostname=host,
                    host=str(ip),
                    port=port,
                    family=ip_family,
                    proto=socket.IPPROTO_TCP,
                    flags=0,
                )
            )
        if not results:
            raise OSError(f"the SSRF guard judged no address of family {family!r} for {host!r}")
        return results

    async def close(self) -> None:
        return None
