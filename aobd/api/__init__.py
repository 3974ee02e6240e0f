"""The HTTP API (DESIGN.md section 9): ASGI app served by granian, streams, auth, OpenAPI."""
