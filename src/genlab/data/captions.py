"""Captions for a folder of images (``data=folder data.captions=true``), for text-to-image
models (``model=text_flow``). Two ways to give an image its caption, the first that has one
wins:

- ``captions.jsonl`` at the folder's root, one JSON object a line:
  ``{"file": "<path relative to the root>", "caption": "..."}``;
- ``<image stem>.txt`` beside the image (``cats/001.png`` -> ``cats/001.txt``), its text
  stripped (the convention of many captioned datasets).

A missing caption is one ``ConfigError`` line naming the image and both ways to give one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from genlab.utils import ConfigError

CAPTIONS_FILE = "captions.jsonl"

__all__ = ["CAPTIONS_FILE", "read_captions", "read_captions_file"]


def read_captions_file(path: Path) -> dict[str, str]:
    """``captions.jsonl`` -> {relative path (POSIX): caption}; {} when the file is absent.
    A line that is not ``{"file": str, "caption": str}`` is a ConfigError naming the line."""
    if not path.is_file():
        return {}
    out: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            name, caption = entry["file"], entry["caption"]
            if not isinstance(name, str) or not isinstance(caption, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise ConfigError(
                f'{path}:{number}: expected a JSON line {{"file": "<relative path>", '
                f'"caption": "<text>"}}, got {line.strip()[:80]!r}'
            ) from None
        out[Path(name).as_posix()] = caption
    return out


def read_captions(root: Path, files: Sequence[Path]) -> list[str]:
    """The caption of every image in ``files`` (paths under ``root``), in order."""
    root = Path(root)
    listed = read_captions_file(root / CAPTIONS_FILE)
    out = []
    for file in files:
        rel = Path(file).relative_to(root).as_posix()
        if rel in listed:
            out.append(listed[rel])
            continue
        beside = Path(file).with_suffix(".txt")
        if beside.is_file():
            out.append(beside.read_text(encoding="utf-8").strip())
            continue
        raise ConfigError(
            f"no caption for {rel} in {root}: add the line "
            f'{{"file": "{rel}", "caption": "..."}} to {root / CAPTIONS_FILE}, or write '
            f"{beside.relative_to(root).as_posix()} beside the image"
        )
    return out
