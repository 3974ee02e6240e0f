"""``aobctl``: the admin client of the aobd daemon (DESIGN.md section 8).

It talks to the daemon's HTTP/JSON API over the admin unix socket (the default) or over HTTP(S) with a Bearer
token. It imports almost nothing at start (stdlib ``http.client``, ``json``) so that it answers in tens of
milliseconds: ``aobd.ctl.main`` must not import msgspec, orjson, aiohttp, granian, uvloop or the engine.
"""
