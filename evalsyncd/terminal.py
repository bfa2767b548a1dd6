"""Text for a terminal: control characters from a bucket are shown, never obeyed.

Run ids, model names, benchmark names and error messages that the CLI prints
come from buckets other hosts write. A name holding ``ESC [2K ESC [1A`` would
erase the warning lines printed above it, ``ESC ]0;...BEL`` would retitle the
terminal. :func:`printable` is the one escaping every line of the CLI's text
output goes through (``evalsyncd.cli``); JSON output is escaped by
``json.dumps`` itself.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["one_line", "printable"]

_UNSAFE: Final = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
"""C0 controls but tab and newline, DEL, C1 controls, lone surrogates."""


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"  # a byte that was not UTF-8 (surrogateescape)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with every control character but tab and newline (C0, DEL, C1) shown as
    ``\\xNN`` and lone surrogates (bytes of a name that are not UTF-8) as ``\\xNN`` or
    ``\\uNNNN``: safe to write to a terminal, and always encodable as UTF-8.

    >>> printable("run\\x1b[2Kx\\n")
    'run\\\\x1b[2Kx\\n'
    """
    return _UNSAFE.sub(_escape, text)


def one_line(text: str) -> str:
    """:func:`printable`, with newlines shown as ``\\n`` too (a carriage return already is,
    as ``\\x0d``): one value that cannot start a line of its own (a log line's field).

    >>> one_line("a\\nfake_event=1")
    'a\\\\nfake_event=1'
    """
    return printable(text).replace("\n", "\\n")
