"""Outbound-request safety: the SSRF guard that every ``http`` node and every patched URL passes through.

See :mod:`aobd.security.ssrf` for the rules and for the aiohttp resolver that pins connections to the
addresses the guard judged.
"""
