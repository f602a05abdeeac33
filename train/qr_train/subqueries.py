"""The subquery text format shared with the server.

The model writes subqueries joined by ' | ' (spaces around the bar, so a name after the bar is
tokenised exactly as in the query and can be copied piece by piece). Splitting follows the
server's rule: split on '|', trim, collapse whitespace, drop empties, de-duplicate
case-insensitively keeping the first, fall back to the query when nothing is left.
"""
from __future__ import annotations

import re
from typing import Sequence

SEPARATOR = " | "
_WS = re.compile(r"\s+")


def join(subqueries: Sequence[str]) -> str:
    return SEPARATOR.join(subqueries)


def split(text: str, query: str) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for part in text.split("|"):
        part = _WS.sub(" ", part).strip()
        if part and part.lower() not in seen:
            seen.add(part.lower())
            out.append(part)
    return out or [query.strip()]
