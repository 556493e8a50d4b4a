"""Ids given by a unique prefix (at least 4 characters, as git takes commit ids): jobs and batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from api_client.errors import DiffgentorError, UsageError

ID_LENGTH = 36  # a UUID; shorter references are prefixes
MIN_PREFIX = 4
SHOWN_CANDIDATES = 5


def resolve_prefix(
    reference: str,
    *,
    noun: str,
    listing: str,
    lookup: Callable[[str, int], Sequence[str]],
    not_found: Callable[[str], DiffgentorError],
) -> str:
    """The full id ``reference`` names. ``lookup(prefix, limit)`` returns matching ids; an unknown
    prefix raises ``not_found(prefix)``, an ambiguous one a `UsageError` listing a few matches, and
    one shorter than `MIN_PREFIX` a `UsageError` naming ``listing`` (the command that shows ids)."""
    text = str(reference).strip()
    if len(text) >= ID_LENGTH:
        return text
    if len(text) < MIN_PREFIX:
        raise UsageError(
            f"{noun} id {text!r} is too short: give the full id or at least {MIN_PREFIX} characters of it "
            f"(`{listing}` shows the ids)"
        )
    matches = list(lookup(text, SHOWN_CANDIDATES + 1))
    if not matches:
        raise not_found(text)
    if len(matches) > 1:
        shown = ", ".join(matches[:SHOWN_CANDIDATES])
        more = " and more" if len(matches) > SHOWN_CANDIDATES else ""
        raise UsageError(
            f"{noun} id prefix {text} is ambiguous: it matches {shown}{more}; give more characters"
        )
    return str(matches[0])
