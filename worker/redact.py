"""Hide secrets in URLs before they reach a log line, an exception or a job row."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "***"

# Query parameters that carry credentials: presigned S3 URLs and common token styles.
_SECRET_QUERY_KEYS = frozenset(
    {
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "signature",
        "sig",
        "token",
        "access_token",
        "password",
        "awsaccesskeyid",
    }
)


def redact_url(url: str) -> str:
    """Return ``url`` with any password and credential query values replaced by ``***``.

    Strings that are not URLs (local paths, garbage) come back unchanged, so callers can pass any
    user-supplied reference without checking first.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:{REDACTED}@{hostport}" if has_password else netloc
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(key.lower() in _SECRET_QUERY_KEYS for key, _ in pairs):
            query = urlencode(
                [(key, REDACTED if key.lower() in _SECRET_QUERY_KEYS else value) for key, value in pairs],
                safe="*/:",
            )
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_urls_in(text: str) -> str:
    """Redact every URL found inside free text, such as a library's exception message."""
    return _URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), text)
