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


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_USER = re.compile(r"[^:@/?#]*")
_PORT = re.compile(r"\d{1,5}")


def redact_userinfo(url: str) -> str:
    """Replace the password of ``scheme://user:password@host...`` with ``***``.

    The password runs from ``user:`` to the LAST ``@`` (searched before the first ``?``/``#`` when
    there is one there, else in the whole string): an unescaped ``/``, ``@``, ``?`` or ``#`` in a
    password would otherwise end it early and leak the rest (``urlsplit`` stops the host at the
    first ``/``). ``host:port/...@...`` is not a password: an all-digit port before the first ``/``
    with no ``@`` in that segment.
    """
    scheme = _SCHEME.match(url)
    if scheme is None:
        return url
    start = scheme.end()
    user = _USER.match(url, start)
    colon = user.end() if user else start
    if colon >= len(url) or url[colon] != ":":
        return url  # no `user:` prefix, so no password
    rest = url[colon + 1 :]
    head = re.split(r"[?#]", rest, maxsplit=1)[0]
    at = head.rfind("@")
    if at < 0:
        at = rest.rfind("@")
    if at < 0:
        return url
    first_segment = rest.split("/", 1)[0]
    if "@" not in first_segment and _PORT.fullmatch(first_segment):
        return url  # host:port followed by a path that contains an `@`
    return f"{url[: colon + 1]}{REDACTED}{rest[at:]}"


def redact_url(url: str) -> str:
    """Return ``url`` with any password and credential query values replaced by ``***``.

    Strings that are not URLs (local paths, garbage) come back unchanged, so callers can pass any
    user-supplied reference without checking first.
    """
    url = redact_userinfo(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(key.lower() in _SECRET_QUERY_KEYS for key, _ in pairs):
            query = urlencode(
                [(key, REDACTED if key.lower() in _SECRET_QUERY_KEYS else value) for key, value in pairs],
                safe="*/:",
            )
    if query == parts.query:
        return url
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_urls_in(text: str) -> str:
    """Redact every URL found inside free text, such as a library's exception message."""
    return _URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), text)
