"""Optional API keys: ``Authorization: Bearer <key>`` on every request once any key is configured.

- No key configured: everything is open (this middleware is not installed).
- Missing or malformed ``Authorization``: 401 ``unauthorized``; a key that matches none: 403
  ``forbidden``. Both are JSON ``{"error", "detail"}`` with a ``WWW-Authenticate: Bearer`` header,
  sent before the body is read.
- Open without a key: /healthz, /readyz and /metrics (unless ``auth_protect_ops``), and the API
  documentation (/docs, /redoc, /openapi.json), which describes the API and holds no data.

Keys are compared in constant time: the SHA-256 of the presented token is compared with the SHA-256
of every configured key (``hmac.compare_digest`` over equal-length digests, all keys every time), so
neither the position of a mismatch nor which key matched nor the keys' lengths show in the timing.
Neither keys nor tokens are logged.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import ErrorCode, error_response
from service.metrics import Metrics

OPS_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
REALM = "lalic"
_SCHEME = "bearer"


def needs_key(path: str, protect_ops: bool) -> bool:
    """Whether a request to ``path`` needs a key (when keys are configured)."""
    normalised = path.rstrip("/") or "/"
    return normalised not in DOC_PATHS and (protect_ops or normalised not in OPS_PATHS)


class ApiKeys:
    """The configured keys, kept only as SHA-256 digests."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = tuple(hashlib.sha256(key.encode("utf-8")).digest() for key in keys)

    def __len__(self) -> int:
        return len(self._digests)

    def matches(self, token: str) -> bool:
        """Whether ``token`` is one of the keys (constant time in the token and over all keys)."""
        presented = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(presented, digest)
        return found


def bearer_token(header: bytes | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value, or None if missing or malformed."""
    if header is None:
        return None
    try:
        text = header.decode("ascii")
    except UnicodeDecodeError:
        return None
    scheme, _, token = text.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != _SCHEME or not token or any(ch <= " " or ch > "~" for ch in token):
        return None
    return token


class AuthMiddleware:
    """Refuses HTTP requests without a valid key, except on the open paths."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, metrics: Metrics, protect_ops: bool = False) -> None:
        self.app = app
        self.keys = keys
        self.metrics = metrics
        self.protect_ops = protect_ops

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not needs_key(scope["path"], self.protect_ops):
            await self.app(scope, receive, send)
            return
        headers = [value for name, value in scope["headers"] if name == b"authorization"]
        token = bearer_token(headers[0]) if len(headers) == 1 else None
        if token is None:
            response = error_response(
                self.metrics,
                401,
                ErrorCode.UNAUTHORIZED,
                "this service needs an API key: send 'Authorization: Bearer <key>'",
                {"WWW-Authenticate": f'Bearer realm="{REALM}"'},
            )
        elif not self.keys.matches(token):
            response = error_response(
                self.metrics,
                403,
                ErrorCode.FORBIDDEN,
                "the API key is not valid",
                {"WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_token"'},
            )
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)
