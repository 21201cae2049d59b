"""API keys: read from `SUR_API_KEYS` (comma-separated) and/or `SUR_API_KEYS_FILE`.

Requests carry one in the `X-API-Key` header; it is compared with every configured key in
constant time (`hmac.compare_digest`), so the response time does not tell which key, or
how much of one, matched.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from pathlib import Path

from fastapi import HTTPException, Security, status
from fastapi.security import APIKeyHeader

from serving.settings import API_KEYS_ENV, API_KEYS_FILE_ENV

API_KEY_HEADER = "X-API-Key"
MIN_KEY_CHARS = 16


class ApiKeyError(ValueError):
    """No usable API key is configured."""


def load_api_keys(environ: Mapping[str, str] | None = None) -> tuple[bytes, ...]:
    """The configured keys (env list plus key file, one key a line, `#` comments).

    Raises ApiKeyError when there is none or one is shorter than MIN_KEY_CHARS.
    """
    environ = os.environ if environ is None else environ
    keys = [key.strip() for key in environ.get(API_KEYS_ENV, "").split(",")]
    file_name = environ.get(API_KEYS_FILE_ENV)
    if file_name:
        path = Path(file_name)
        if not path.is_file():
            raise ApiKeyError(f"{API_KEYS_FILE_ENV}={file_name}: no such file")
        lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
        keys += list(lines)
    keys = [key for key in keys if key]
    if not keys:
        raise ApiKeyError(
            f"no API key configured: set {API_KEYS_ENV} (comma-separated) or "
            f"{API_KEYS_FILE_ENV} (a file with one key a line)"
        )
    short = [index for index, key in enumerate(keys, 1) if len(key) < MIN_KEY_CHARS]
    if short:
        raise ApiKeyError(
            f"API key(s) number {short} are shorter than {MIN_KEY_CHARS} characters; "
            "use e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    return tuple(key.encode() for key in dict.fromkeys(keys))


def key_matches(given: str, keys: tuple[bytes, ...]) -> bool:
    """Whether `given` equals one of `keys`; every key is compared, in constant time each."""
    candidate = given.encode("utf-8", "surrogateescape")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key)
    return matched


class ApiKeyChecker:
    """FastAPI dependency: 401 unless `X-API-Key` holds a configured key."""

    scheme = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, scheme_name="ApiKey")

    def __init__(self, keys: tuple[bytes, ...]) -> None:
        self.keys = keys

    async def __call__(self, given: str | None = Security(scheme)) -> None:
        # async: a cheap check, run on the event loop rather than in a worker thread
        if not given or not key_matches(given, self.keys):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail=f"missing or invalid API key: send it in the {API_KEY_HEADER} header",
                headers={"WWW-Authenticate": "ApiKey"},
            )
