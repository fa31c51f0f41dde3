"""Small text helpers shared by the search-based envs (shop, searchqa)."""

from __future__ import annotations

import itertools
import re

MAX_QUERY_TOKENS = 32     # longer queries are cut, so junk input stays cheap and echoes short
MAX_TOKEN_CHARS = 24
TOKEN_RE = re.compile(r"[a-z0-9]+")


def query_tokens(text: str) -> tuple[str, ...]:
    """A search query as at most MAX_QUERY_TOKENS tokens of at most MAX_TOKEN_CHARS characters."""
    matches = itertools.islice(TOKEN_RE.finditer(text.lower()), MAX_QUERY_TOKENS)
    return tuple(m.group()[:MAX_TOKEN_CHARS] for m in matches)


def clip(text: str, limit: int = 60) -> str:
    """Echo at most `limit` characters of user text back in feedback."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
