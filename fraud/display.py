"""Showing stream entries to a person without letting their content take over the terminal.

Anything can be in a Redis stream: a producer bug, a hostile upstream or a hand-typed `XADD`
may write non-UTF-8 bytes, terminal escape sequences (`ESC [2J` clears the screen, `ESC ]…`
sets the title or a hyperlink, `\\r` and backspace rewrite a line, bidi overrides reorder it),
megabytes in one field or JSON nested a hundred thousand levels deep. The readers (`fraud
alerts`, `fraud dead-letters`, `fraud drift`, `fraud alert-precision`) go through these helpers so that no
entry can crash them or forge what the operator sees:

- `decode`: bytes become text with invalid UTF-8 shown as `\\xNN` (backslashreplace), never an error;
- `escape`: every non-printable character (C0/C1 controls including ESC, CR, tab and newline, DEL,
  format characters such as bidi overrides and zero-width ones, line/paragraph separators,
  surrogates, private-use and unassigned code points: what `str.isprintable` rejects, the space
  aside) is written as a visible `\\xNN`, `\\uNNNN` or `\\UNNNNNNNN` (`\\t`, `\\n`, `\\r` for those
  three); ordinary printable Unicode is kept. Backslashes in the data are not doubled, so `\\x1b`
  in text output may also be those four characters literally; `--json` output is exact;
- `cap`: text output keeps the first `FIELD_CAP` characters of a field and says how many were cut;
- `loads`: JSON decoding whose only failure is `ValueError` (a deep nesting's `RecursionError`
  included);
- `write_line`: one line, flushed, with characters the output's encoding lacks backslash-escaped.

JSON output needs no escaping of its own: `json.dumps` with `ensure_ascii=True` writes every
control and non-ASCII character as `\\uNNNN`, so it is complete and safe at once.
"""

from __future__ import annotations

import json
from typing import Any, TextIO

FIELD_CAP = 512
UNKNOWN = "?"
_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def decode(value: Any) -> str:
    """Text of a Redis value: bytes as UTF-8 with invalid bytes as `\\xNN`; anything else via str."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="backslashreplace")
    return value if isinstance(value, str) else str(value)


def _escape_char(ch: str) -> str:
    if ch.isprintable():
        return ch
    short = _SHORT.get(ch)
    if short:
        return short
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape(text: str) -> str:
    """`text` with every non-printable character written as a visible escape (see the module doc)."""
    if text.isprintable():  # the common case: nothing to do
        return text
    return "".join(map(_escape_char, text))


def cap(text: str, limit: int | None = FIELD_CAP) -> str:
    """The first `limit` characters of `text` and `… (N more characters)` when it was longer."""
    if limit is None or len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


def show(value: Any, limit: int | None = FIELD_CAP, *, missing: str = UNKNOWN) -> str:
    """A field for text output: decoded, capped, escaped; `missing` when None or empty.

    Capping comes before escaping so the count is in characters of the value, and a 10 MB field
    costs no more to escape than a short one.
    """
    if value is None:
        return missing
    text = decode(value)
    return escape(cap(text, limit)) if text else missing


def loads(raw: str) -> Any:
    """`json.loads` whose every failure is a `ValueError`.

    The C decoder recurses once per nesting level, so `[[[[…` a few thousand levels deep raises
    `RecursionError`, which is not a `ValueError` and used to escape the readers' handlers.
    """
    try:
        return json.loads(raw)
    except RecursionError as exc:
        raise ValueError("JSON nested too deep") from exc
    except (TypeError, MemoryError) as exc:
        raise ValueError(f"undecodable JSON: {type(exc).__name__}") from exc


def write_line(out: TextIO, line: str) -> None:
    """Write `line` and a newline, then flush, so the caller knows the line left this process.

    A terminal whose encoding lacks a character (e.g. a Latin-1 locale and an emoji) gets it
    backslash-escaped instead of a `UnicodeEncodeError`; `TextIOWrapper` encodes the whole string
    before writing, so a failed first attempt wrote nothing.
    """
    try:
        out.write(line + "\n")
    except UnicodeEncodeError:
        encoding = getattr(out, "encoding", None) or "ascii"
        out.write(line.encode(encoding, errors="backslashreplace").decode(encoding) + "\n")
    out.flush()


def print_json(doc: Any) -> None:
    """`doc` as indented JSON on stdout; ensure_ascii (the default, made explicit): control
    characters from stream data leave as \\uNNNN."""
    print(json.dumps(doc, indent=2, default=str, ensure_ascii=True), flush=True)
