"""What a visitor may see: texts with no server paths in them."""
from __future__ import annotations

import re
from pathlib import PurePath

ABSOLUTE_PATH = re.compile(r"(?<![\w:/.])(?:~|[A-Za-z]:)?(?:/[^\s'\"`<>(),;:]+)+/?")


def scrub(text: str) -> str:
    """``text`` with every absolute path cut to its last part: ``/srv/cache/uploads/ab12-data.json`` → ``data.json``."""
    def name(match: re.Match) -> str:
        path = match.group(0)
        if path.startswith("//") or "://" in text[max(0, match.start() - 3):match.start() + 3]:
            return path
        last = PurePath(path.rstrip("/")).name
        return re.sub(r"^[0-9a-f]{16}-", "", last) or "…"

    return ABSOLUTE_PATH.sub(name, text)
