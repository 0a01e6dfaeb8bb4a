"""Reading JSON that came from anywhere (policies, annotations, profile headers) with limits.

A policy or an annotation file may be downloaded; these limits make a hostile or broken
file fail with one :class:`~hermes_policy.errors.HermesError` line instead of a traceback,
a huge allocation or a stack overflow: a size cap on the text, a digit cap on integers
(Python refuses more than 4,300 digits with a bare ValueError) and a nesting-depth cap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hermes_policy.errors import HermesError

MAX_JSON_BYTES = 64 * 2**20  # an annotation file of a large benchmark is a few MiB
MAX_INTEGER_DIGITS = 30  # frame counts, budgets, layer indices: far below this
MAX_DEPTH = 32  # a policy nests 4 levels, an annotation file 4


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_INTEGER_DIGITS})")
    return int(text)


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_json_text(text: str, source: str, error: type[HermesError] = HermesError) -> Any:
    """Parse ``text`` within the limits; ``error`` (naming ``source``) for anything wrong."""
    if len(text) > MAX_JSON_BYTES:
        raise error(f"{source} is {len(text)} characters long, more than the limit of {MAX_JSON_BYTES}")
    try:
        data = json.loads(text, parse_int=_bounded_int)
    except json.JSONDecodeError as exc:
        raise error(f"{source} is not valid JSON: {exc}") from None
    except RecursionError:
        raise error(f"{source} is nested too deeply (at most {MAX_DEPTH} levels)") from None
    except ValueError as exc:  # from _bounded_int, or a float Python cannot represent
        raise error(f"{source} is not acceptable JSON: {exc}") from None
    if _depth(data) > MAX_DEPTH:
        raise error(f"{source} is nested too deeply (at most {MAX_DEPTH} levels)")
    return data


def load_json_file(path: str | Path, source: str | None = None,
                   error: type[HermesError] = HermesError) -> Any:
    """Read and parse a JSON file within the limits (size checked before reading)."""
    path = Path(path)
    name = source or str(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise error(f"{name} is {size} bytes, more than the limit of {MAX_JSON_BYTES}")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{name} is not valid JSON: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise error(f"cannot read {name}: {exc.strerror or exc}") from None
    return parse_json_text(text, name, error)
