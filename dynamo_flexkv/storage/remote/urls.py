"""The grammar every store URL shares (`remote_store`): scheme://[userinfo@]host:port[/path], no
query or fragment. Each backend's `parse_url` adds its own rules on top (storage/backend.py's
`parse_store_url` picks the backend by scheme). Errors name the setting and the allowed form, with
any password redacted."""

from __future__ import annotations

from urllib.parse import SplitResult, unquote, urlsplit

from dynamo_flexkv.logs import redact_url
from dynamo_flexkv.storage.backend import StoreUrlError

SETTING = "remote_store"
TLS_SETTINGS = ("remote_tls_ca_file", "remote_tls_cert_file", "remote_tls_key_file")  # rediss:// only


def url_error(url: str, form: str, why: str) -> StoreUrlError:
    return StoreUrlError(redact_url(url), f"{why}; expected {form}")


def split_store_url(url: object, schemes: tuple[str, ...], form: str) -> SplitResult:
    """`url` split, with a host and a port 1-65535 and nothing after the path."""
    if not isinstance(url, str):
        raise ValueError(f"{SETTING} must be a URL string; expected {form}")
    url = url.strip()
    try:
        split = urlsplit(url)
        port = split.port
    except ValueError:
        raise url_error(url, form, "the port must be a number 1-65535") from None
    if split.scheme.lower() not in schemes:
        raise url_error(url, form, f"scheme {split.scheme or '(none)'}:// is not this backend's")
    if not split.hostname or not port:
        raise url_error(url, form, "host and port are required")
    if split.query or split.fragment:
        raise url_error(url, form, "no ?query or #fragment")
    return split


def credentials(split: SplitResult) -> tuple[str | None, str | None]:
    """The URL's user and password, percent-decoded (a password may hold '@' or ':' as %40, %3A)."""
    user = unquote(split.username) if split.username else None
    password = unquote(split.password) if split.password is not None else None
    return user, password
