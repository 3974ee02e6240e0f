"""Unit tests of the SSRF guard: address judging, URL parsing, allow-lists, name rules and pinning."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest
from yarl import URL

from aobd.errors import ConfigError, SsrfDenied
from aobd.security.ssrf import (
    AllowList,
    PinnedResolver,
    Target,
    UnresolvableHost,
    UrlGuard,
    default_resolver,
    judge_address,
    parse_ipv4_host,
    pin_target,
    resolve_redirect,
    static_check_url,
)

T = TypeVar("T")


def run(awaitable: Awaitable[T]) -> T:
    async def main() -> T:
        return await awaitable

    return asyncio.run(main())


class StubResolver:
    """Maps names to fixed answers and records every question; unknown names do not resolve."""

    def __init__(self, table: dict[str, list[str]] | None = None) -> None:
        self.table = table or {}
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        if host in self.table:
            return list(self.table[host])
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def denied(guard: UrlGuard, url: str) -> SsrfDenied:
    with pytest.raises(SsrfDenied) as info:
        run(guard.check_url(url))
    return info.value


def reason_of(exc: SsrfDenied) -> Any:
    return exc.details[0]["reason"]


# ----------------------------------------------------------------------------------------- judge_address


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped: ipaddress says not is_loopback
        ("::127.0.0.1", "loopback"),  # IPv4-compatible: ipaddress says is_global
        ("64:ff9b::7f00:1", "loopback"),  # NAT64 well-known prefix: ipaddress says is_global
        ("64:ff9b:1::a9fe:a9fe", "metadata"),  # local-use NAT64, /96 form
        ("64:ff9b:1:ab::1", "nat64"),  # local-use NAT64 with the IPv4 part elsewhere: cannot judge
        ("::ffff:0:7f00:1", "loopback"),  # IPv4-translated (SIIT)
        ("2002:7f00:1::1", "loopback"),  # 6to4 of 127.0.0.1
        ("2002:a9fe:a9fe::", "metadata"),
        ("::ffff:a9fe:a9fe", "metadata"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.1.1", "link_local"),
        ("169.254.169.254", "metadata"),
        ("169.254.170.2", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("fe80::1", "link_local"),
        ("fe80::1%eth0", "link_local"),
        ("100.64.0.1", "cgnat"),
        ("100.127.255.254", "cgnat"),
        ("100.100.100.200", "metadata"),
        ("192.0.0.1", "ietf_protocol"),
        ("192.0.0.192", "metadata"),  # ipaddress says is_global
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "broadcast"),
        ("192.0.2.10", "documentation"),
        ("198.51.100.7", "documentation"),
        ("203.0.113.9", "documentation"),
        ("2001:db8::1", "documentation"),
        ("198.18.0.1", "benchmark"),
        ("2001::1", "ietf_protocol"),  # Teredo
        ("fec0::1", "site_local"),
        ("100::1", "reserved"),
        ("4000::1", "reserved"),
    ],
)
def test_judge_address_denies(address: str, reason: str) -> None:
    verdict = judge_address(address)
    assert verdict.denied
    assert verdict.reason == reason


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "1.1.1.1", "93.184.215.14", "100.63.255.255", "100.128.0.0", "172.32.0.1", "192.0.1.1",
     "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1", "64:ff9b:1::808:808"],
)  # fmt: skip
def test_judge_address_allows_public(address: str) -> None:
    verdict = judge_address(address)
    assert not verdict.denied, verdict.describe()


def test_judge_address_maps_embedded_ipv4_and_explains() -> None:
    verdict = judge_address("::ffff:127.0.0.1")
    assert (verdict.embedded, verdict.embedding, verdict.network) == (
        "127.0.0.1",
        "IPv4-mapped",
        "127.0.0.0/8",
    )
    assert verdict.describe() == "::ffff:7f00:1 (IPv4-mapped 127.0.0.1), which is loopback (127.0.0.0/8)"
    # The reason the deny-list is explicit: these are what ipaddress itself reports (README facts).
    assert not ipaddress.ip_address("::ffff:127.0.0.1").is_loopback
    assert ipaddress.ip_address("64:ff9b::7f00:1").is_global


def test_judge_address_rejects_non_addresses() -> None:
    with pytest.raises(ValueError):
        judge_address("localhost")


# ------------------------------------------------------------------------------------- numeric IPv4 hosts


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0x7F.1", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("3232235777", "192.168.1.1"),
        ("0xa9fea9fe", "169.254.169.254"),
        ("0xA9.0xFE.0xA9.0xFE", "169.254.169.254"),
        ("0251.0376.0251.0376", "169.254.169.254"),
        ("0251.00376.000251.0000376", "169.254.169.254"),
        ("127.0.0.1.", "127.0.0.1"),
    ],
)
def test_parse_ipv4_host_legacy_forms(host: str, expected: str) -> None:
    assert str(parse_ipv4_host(host)) == expected


@pytest.mark.parametrize(
    "host",
    ["425.510.425.510", "7147006462", "0x41414141A9FEA9FE", "o177.0.0.1", "1.2.3.4.5", "0x1g.1", "a.1"],
)
def test_parse_ipv4_host_refuses_numbers_that_are_not_addresses(host: str) -> None:
    with pytest.raises(ValueError):
        parse_ipv4_host(host)


@pytest.mark.parametrize("host", ["example.com", "localhost", "1.2.3.example", "0x7f.example"])
def test_parse_ipv4_host_leaves_names_alone(host: str) -> None:
    assert parse_ipv4_host(host) is None


@pytest.mark.parametrize("host", ["2130706433", "0177.0.0.1", "0x7f000001", "127.1", "127.0.1", "0"])
def test_legacy_forms_parse_as_getaddrinfo_resolves_them(host: str) -> None:
    # Numeric hosts never reach DNS: getaddrinfo answers them with inet_aton, and so must the guard.
    assert run(default_resolver(host, 80)) == [str(parse_ipv4_host(host))]


@pytest.mark.parametrize(
    "url",
    ["http://2130706433/", "http://0177.0.0.1/", "http://0x7f000001/", "http://127.1/", "http://0/",
     "http://3232235521/", "http://0xa9fea9fe/", "http://0251.254.169.254/",
     "http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/"],  # fullwidth digits: IDNA maps them to 127.0.0.1
)  # fmt: skip
def test_encoded_literals_are_judged_without_dns(url: str) -> None:
    stub = StubResolver()
    exc = denied(UrlGuard(resolver=stub), url)
    assert reason_of(exc) in {"loopback", "private", "metadata", "unspecified"}
    assert stub.calls == []


def test_encoded_literal_is_rewritten_to_the_address_it_was_judged_as() -> None:
    target = run(UrlGuard(allow=["127.0.0.0/8"]).check_url("http://0x7f000001:8080/x?y=1"))
    assert target.url == URL("http://127.0.0.1:8080/x?y=1")
    assert (target.host, target.port, target.addresses) == ("127.0.0.1", 8080, ("127.0.0.1",))


# ---------------------------------------------------------------------------------------------- check_url


def test_message_names_url_host_address_rule_and_fix() -> None:
    stub = StubResolver({"x": ["127.0.0.1"]})
    exc = denied(UrlGuard(resolver=stub), "http://x/")
    assert exc.message.startswith("http://x/ resolves to 127.0.0.1, which is loopback (127.0.0.0/8); ")
    assert "security.http_allow" in exc.message
    assert exc.code == "ssrf_denied"
    assert exc.details[0] | {"message": None} == {
        "url": "http://x/",
        "host": "x",
        "address": "127.0.0.1",
        "reason": "loopback",
        "network": "127.0.0.0/8",
        "message": None,
    }
    assert stub.calls == [("x", 80)]


@pytest.mark.parametrize(
    ("answers", "reason"),
    [
        (["10.0.0.5"], "private"),
        (["::ffff:127.0.0.1"], "loopback"),
        (["::127.0.0.1"], "loopback"),
        (["64:ff9b::a9fe:a9fe"], "metadata"),
        (["100.64.1.1"], "cgnat"),
        (["192.0.0.170"], "ietf_protocol"),
        (["0.0.0.0"], "unspecified"),
        (["::"], "unspecified"),
        (["fd00:ec2::254"], "metadata"),
        (["93.184.215.14", "169.254.169.254"], "metadata"),  # one bad answer is enough
    ],
)
def test_names_are_judged_by_every_resolved_address(answers: list[str], reason: str) -> None:
    stub = StubResolver({"api.example.com": answers})
    exc = denied(UrlGuard(resolver=stub), "https://api.example.com/v1")
    assert reason in {d["reason"] for d in exc.details}


def test_public_name_passes_with_every_address_kept_for_pinning() -> None:
    stub = StubResolver({"api.example.com": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]})
    target = run(UrlGuard(resolver=stub).check_url("https://API.Example.com./v1?q=1"))
    assert target.addresses == ("93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c")
    assert (target.host, target.port) == ("api.example.com.", 443)
    assert stub.calls == [("api.example.com", 443)]


def test_resolver_answer_that_is_not_an_address_is_refused() -> None:
    exc = denied(UrlGuard(resolver=StubResolver({"a.example": ["not-an-ip"]})), "http://a.example/")
    assert reason_of(exc) == "unresolvable"


def test_unresolvable_name_is_its_own_error() -> None:
    with pytest.raises(UnresolvableHost) as info:
        run(UrlGuard(resolver=StubResolver()).check_url("http://nowhere.example/"))
    assert isinstance(info.value, SsrfDenied)
    assert info.value.code == "host_unresolvable"


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/", "file:///etc/passwd", "gopher://example.com:70/", "jar:http://example.com!/",
     "javascript:alert(1)", "data:text/plain,hi", "ws://example.com/", "//example.com/", "example.com/x",
     "dict://example.com:11211/", "http:example.com/"],
)  # fmt: skip
def test_only_http_and_https(url: str) -> None:
    exc = denied(UrlGuard(resolver=StubResolver({"example.com": ["93.184.215.14"]})), url)
    assert reason_of(exc) == "malformed"


def test_scheme_is_case_insensitive() -> None:
    stub = StubResolver({"example.com": ["93.184.215.14"]})
    assert run(UrlGuard(resolver=stub).check_url("HTTPS://example.com/")).port == 443


@pytest.mark.parametrize(
    "url", ["http://user:secret@example.com/", "http://user@example.com/", "http://:pw@example.com/"]
)
def test_credentials_in_userinfo_are_refused_not_stripped(url: str) -> None:
    stub = StubResolver({"example.com": ["93.184.215.14"]})
    exc = denied(UrlGuard(resolver=stub), url)
    assert reason_of(exc) == "malformed"
    assert "config.headers" in exc.message
    assert static_check_url(url) != []
    assert stub.calls == []


@pytest.mark.parametrize(
    "url",
    ["http://exa mple.com/", "http://example.com/a b", "http://example.com/\t", "http://example.com/\x00",
     "http://example.com\r\nHost: evil/", "http://example.com/a\\b", "http://127.1.1.1:80\\@127.2.2.2:80/",
     "http://example.com:99999/", "http://example.com:0/", "http://example.com:abc/", "http:///path",
     "http://[fe80::1%25eth0]/", "http://a..b/", "http://%31%32%37.0.0.1/", "http://ex*ample.com/",
     "http://" + "a" * 9000 + ".com/", "http://example.com/\u2028"],
)  # fmt: skip
def test_malformed_urls(url: str) -> None:
    stub = StubResolver({"example.com": ["93.184.215.14"]})
    exc = denied(UrlGuard(resolver=stub), url)
    assert reason_of(exc) == "malformed"
    assert stub.calls == []


@pytest.mark.parametrize(
    "url",
    ["http://localhost/", "http://LOCALHOST./", "http://foo.localhost:8080/", "http://ip6-localhost/",
     "http://ⓛⓞⓒⓐⓛⓗⓞⓢⓣ/"],
)  # fmt: skip
def test_loopback_names_never_reach_dns(url: str) -> None:
    stub = StubResolver({"localhost": ["93.184.215.14"]})  # a lying /etc/hosts changes nothing
    exc = denied(UrlGuard(resolver=stub), url)
    assert reason_of(exc) == "loopback"
    assert stub.calls == []


@pytest.mark.parametrize(
    "url",
    ["http://metadata.google.internal/computeMetadata/v1/", "http://instance-data/", "http://metadata/",
     "http://db.svc.cluster.local/", "http://printer.local/", "http://router.home.arpa/"],
)  # fmt: skip
def test_internal_names_are_refused_by_name(url: str) -> None:
    stub = StubResolver()
    exc = denied(UrlGuard(resolver=stub), url)
    assert reason_of(exc) == "denied_name"
    assert stub.calls == []
    assert static_check_url(url) != []


def test_extra_denied_names_apply_after_idna_normalization() -> None:
    stub = StubResolver({"example.com": ["93.184.215.14"]})
    guard = UrlGuard(resolver=stub, deny_names=["Example.COM.", "*.corp.example"])
    assert reason_of(denied(guard, "http://ⓔⓧⓐⓜⓟⓛⓔ.ⓒⓞⓜ/")) == "denied_name"
    assert reason_of(denied(guard, "http://git.corp.example/")) == "denied_name"
    assert stub.calls == []


# ----------------------------------------------------------------------------------------------- allow-list


def test_allow_host_port_entry_is_exact_about_the_port() -> None:
    guard = UrlGuard(allow=["127.0.0.1:8080"], resolver=StubResolver({"svc.test": ["127.0.0.1"]}))
    assert run(guard.check_url("http://127.0.0.1:8080/x")).allowed_by == ("127.0.0.1:8080",)
    assert run(guard.check_url("http://svc.test:8080/x")).addresses == ("127.0.0.1",)
    assert reason_of(denied(guard, "http://127.0.0.1:8081/x")) == "loopback"
    assert reason_of(denied(guard, "http://127.0.0.1/x")) == "loopback"


def test_allow_cidr_entry_covers_any_port_and_embedded_forms() -> None:
    guard = UrlGuard(allow=["127.0.0.0/8"], resolver=StubResolver())
    for url in [
        "http://127.0.0.1/",
        "http://127.9.9.9:2375/",
        "http://[::ffff:127.0.0.1]:81/",
        "http://127.1/",
    ]:
        assert run(guard.check_url(url)).allowed_by == ("127.0.0.0/8",)
    assert reason_of(denied(guard, "http://[::1]/")) == "loopback"  # ::1 is not in 127.0.0.0/8
    assert reason_of(denied(guard, "http://10.0.0.1/")) == "private"


def test_allow_name_entry_admits_what_that_name_resolves_to() -> None:
    stub = StubResolver({"api.internal": ["10.0.0.7"], "other.internal": ["10.0.0.8"]})
    guard = UrlGuard(allow=["api.internal:443", "*.corp.example"], resolver=stub)
    target = run(guard.check_url("https://api.internal/v1"))
    assert (target.addresses, target.allowed_by) == (("10.0.0.7",), ("api.internal:443",))
    assert reason_of(denied(guard, "http://api.internal/v1")) == "denied_name"  # port 80 is not allowed
    assert reason_of(denied(guard, "https://other.internal/")) == "denied_name"
    stub.table["git.corp.example"] = ["10.1.1.1"]
    assert run(guard.check_url("http://git.corp.example:7990/")).allowed_by == ("*.corp.example",)


def test_allow_loopback_name_by_name_or_by_both_addresses() -> None:
    assert run(UrlGuard(allow=["localhost:8080"]).check_url("http://localhost:8080/")).addresses == (
        "127.0.0.1",
        "::1",
    )
    assert run(UrlGuard(allow=["127.0.0.0/8", "::1/128"]).check_url("http://localhost:8080/")).addresses
    # Every address must pass: 127.0.0.0/8 alone leaves ::1 denied.
    assert reason_of(denied(UrlGuard(allow=["127.0.0.0/8"]), "http://localhost:8080/")) == "loopback"


def test_allow_ipv6_entries() -> None:
    guard = UrlGuard(allow=["[::1]:8080", "fd00::/8"])
    assert run(guard.check_url("http://[::1]:8080/")).addresses == ("::1",)
    assert run(guard.check_url("http://[fd00:ec2::254]/")).allowed_by == ("fd00::/8",)
    assert reason_of(denied(guard, "http://[::1]:8081/")) == "loopback"


def test_allow_list_from_comma_separated_string() -> None:
    allow = AllowList("127.0.0.1:8080, 10.0.0.0/8")
    assert [e.text for e in allow.entries] == ["127.0.0.1:8080", "10.0.0.0/8"]


@pytest.mark.parametrize(
    "entry", ["127.0.0.1:0", "host:abc", "10.0.0.0/33", "[::1", "[::1]x", "*", "a b", "0x7f000001", "h:70000"]
)
def test_bad_allow_entries_name_the_key(entry: str) -> None:
    with pytest.raises(ConfigError) as info:
        UrlGuard(allow=[entry])
    assert "security.http_allow" in info.value.message
    assert repr(entry) in info.value.message


# ----------------------------------------------------------------------------------- static and batch checks


def test_static_check_needs_no_io_and_leaves_dns_names_to_runtime() -> None:
    assert static_check_url("https://api.example.com/t/1") == []
    assert static_check_url("http://10.0.0.1/") == [
        "http://10.0.0.1/ targets 10.0.0.1, which is private (10.0.0.0/8); allow it with security.http_allow "
        '(for example "10.0.0.1:80")'
    ]
    assert static_check_url("http://10.0.0.1/", ["10.0.0.0/8"]) == []
    assert len(static_check_url("http://localhost/")) == 2  # 127.0.0.1 and ::1
    assert static_check_url("http://localhost:9000/", AllowList(["localhost:9000"])) == []
    assert "not an acceptable URL" in static_check_url("gopher://x/")[0]


def test_static_check_of_templates() -> None:
    assert static_check_url("https://api.example.com/t/{ticket}?q={q}") == []
    assert static_check_url("https://{host}/t/{ticket}") == []  # judged at run time, once filled
    assert static_check_url("http://{host}:{port}/") == []
    reasons = static_check_url("http://169.254.169.254/latest/{path}")
    assert reasons and reasons[0].startswith("http://169.254.169.254/latest/{path} targets 169.254.169.254")
    assert static_check_url("ftp://{host}/") != []
    assert static_check_url("http://{host}/a b") != []


def test_check_urls_resolves_and_reports_per_url() -> None:
    stub = StubResolver({"good.example": ["93.184.215.14"], "rebind.example": ["10.0.0.1"]})
    guard = UrlGuard(resolver=stub)
    urls = [
        "https://good.example/{id}",
        "https://rebind.example/",
        "http://127.0.0.1/",
        "https://{host}/x",
        "https://good.example/{id}",
        "https://gone.example/",
    ]
    verdicts = run(guard.check_urls(urls))
    assert list(verdicts) == [
        "https://good.example/{id}",
        "https://rebind.example/",
        "http://127.0.0.1/",
        "https://{host}/x",
        "https://gone.example/",
    ]
    assert verdicts["https://good.example/{id}"] == []
    assert "private (10.0.0.0/8)" in verdicts["https://rebind.example/"][0]
    assert "loopback" in verdicts["http://127.0.0.1/"][0]
    assert verdicts["https://{host}/x"] == []
    assert "did not resolve" in verdicts["https://gone.example/"][0]
    assert sorted(stub.calls) == [("gone.example", 443), ("good.example", 443), ("rebind.example", 443)]


# ------------------------------------------------------------------------------------------------- pinning


def _target(host: str, *addresses: str) -> Target:
    return Target(URL(f"http://{host}/"), host, 80, addresses)


def test_pinned_resolver_answers_only_for_the_pinned_target() -> None:
    async def scenario() -> None:
        resolver = PinnedResolver()
        with pytest.raises(OSError):
            await resolver.resolve("api.example.com", 80)
        with pin_target(_target("api.example.com", "93.184.215.14", "2606:2800::1")):
            answers = await resolver.resolve("api.example.com", 80, socket.AF_UNSPEC)
            assert [(a["host"], a["family"], a["port"]) for a in answers] == [
                ("93.184.215.14", socket.AF_INET, 80),
                ("2606:2800::1", socket.AF_INET6, 80),
            ]
            v6 = await resolver.resolve("api.example.com", 80, socket.AF_INET6)
            assert [a["host"] for a in v6] == ["2606:2800::1"]
            with pytest.raises(OSError):
                await resolver.resolve("evil.example", 80)
        with pin_target(_target("v4only.example", "93.184.215.14")), pytest.raises(OSError):
            await resolver.resolve("v4only.example", 80, socket.AF_INET6)
        await resolver.close()

    run(scenario())


def test_resolve_redirect() -> None:
    base = URL("http://api.example.com/a/b?x=1")
    assert resolve_redirect(base, "/c") == "http://api.example.com/c"
    assert resolve_redirect(base, "d") == "http://api.example.com/a/d"
    assert resolve_redirect(base, "//evil.example/x") == "http://evil.example/x"
    assert resolve_redirect(base, "http://127.0.0.1/") == "http://127.0.0.1/"
    for bad in ["", "/a b", "\\\\evil.example/", "http://x/\n"]:
        with pytest.raises(SsrfDenied):
            resolve_redirect(base, bad)


def test_bad_denied_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        UrlGuard(deny_names=["not a name"])
