"""API-key check: a dependency attached to every route except /health and /ready.

Because it hangs off the routes themselves, the decision follows the path the router matched:
`//v1/models`, `/v1/%2E%2E/health` or `/health/../v1/models` either match a protected route
(and are checked) or match nothing (404); none can reach a protected handler unchecked.
"""
from __future__ import annotations

import hmac

from starlette.requests import Request

from turbollm.server.errors import APIError


def make_auth_dependency(api_key: str | None):
    """A FastAPI dependency enforcing `Authorization: Bearer <api_key>` (no-op without a key)."""
    expected = api_key.encode("utf-8") if api_key else None

    async def require_api_key(request: Request) -> None:
        if expected is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # Starlette decodes headers as latin-1: encoding back gives the bytes sent.
        # compare_digest takes time independent of where the two differ.
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode("latin-1"), expected)
        if not ok:
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer "
                           "<key>')", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    return require_api_key
