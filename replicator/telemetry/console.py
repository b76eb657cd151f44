"""Text for a person's terminal: what the commands print, the error line, the text log.

Names printed there come from the databases (a table, a column, a role, a server's message),
and anyone who may create a table on the source chooses them. A name holding ESC or OSC
sequences would otherwise drive the terminal of whoever runs ``check`` or ``status``: change
its title, hide lines, rewrite what was printed before, or make a link say something else.
``printable`` is the one function everything printed for a person goes through.
"""

from __future__ import annotations

import re
from typing import TextIO

__all__ = ["printable", "say"]

# Every C0 control (NUL..US, so ESC, BEL, CR and tab too), DEL and every C1 control (CSI,
# OSC, ST... as single bytes), plus what reorders or breaks lines without being a control:
# the bidirectional overrides and isolates ("Trojan Source") and the Unicode line and
# paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                      "\u2066-\u2069]")


_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(m: re.Match[str]) -> str:
    char = m.group(0)
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, *, multiline: bool = False) -> str:
    """``text`` with every control character written as Python's repr() writes it
    (``\\x1b``, ``\\r``).

    ``multiline`` keeps the line feeds of text made of several lines (a summary, a table, a
    traceback); every other control character is escaped all the same. Text printed one
    line at a time should not pass it, so that a line feed in a name is escaped too.
    Backslashes are left alone, so paths and ordinary messages print as they are.
    """
    if multiline:
        return "\n".join(printable(line) for line in text.split("\n"))
    if not _CONTROL.search(text):
        return text
    return _CONTROL.sub(_escape, text)


def say(text: str, *, file: TextIO | None = None) -> None:
    """Print text for a person (stdout by default), through ``printable``."""
    print(printable(text, multiline=True), file=file)
