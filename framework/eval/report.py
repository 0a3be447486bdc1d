"""Markdown reports: a title, then sections that are either tables or free text."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sapling.io import write_text_atomically

Section = tuple[str, list[str], list[list[Any]]] | tuple[str, str]


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(path: str | os.PathLike, title: str, sections: list[Section]) -> Path:
    parts = [f"# {title}", ""]
    for section in sections:
        parts += [f"## {section[0]}", ""]
        if len(section) == 3:
            parts += [markdown_table(section[1], section[2]), ""]
        else:
            parts += [section[1], ""]
    return write_text_atomically(path, "\n".join(parts))
