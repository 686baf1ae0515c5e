"""Names and reasons made safe to print: one item stays one line, and nothing is invisible.

File names are chosen by whoever made the files. A newline in a name would forge a line of a
summary (``skipped x: ...`` that no file produced), a carriage return or terminal escape could
overwrite what was printed, and a name that is not valid UTF-8 (Python keeps its bytes as lone
surrogates) raises ``UnicodeEncodeError`` when printed. :func:`escape` is for human output
only; machine output (``--json``) carries the names unchanged.
"""

from __future__ import annotations

import os

__all__ = ["escape"]

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# os.fsdecode keeps each byte that is not valid UTF-8 as one lone surrogate U+DC80..U+DCFF.
_ESCAPED_BYTES = range(0xDC80, 0xDD00)


def escape(text: object) -> str:
    """``text`` with control and other non-printable characters written as escapes.

    Printable characters, accented and non-Latin letters included, stay as they are; so do
    backslashes, so ordinary names print unchanged (the escaping is for reading, not for
    parsing back: use ``--json`` for that). Newlines, tabs and carriage returns print as
    ``\\n``, ``\\t``, ``\\r``; a byte that was not valid UTF-8 as ``\\xNN``; other non-printable
    characters (C0/C1 controls, terminal escapes, bidirectional overrides) as ``\\xNN``,
    ``\\uNNNN`` or ``\\UNNNNNNNN``, as :func:`repr` writes them.

    Parameters
    ----------
    text : str, PathLike or object
        What to print; path-likes are converted with :func:`os.fspath` (bytes with
        :func:`os.fsdecode`), anything else with :func:`str`.

    Returns
    -------
    str
        Printable text that encodes as UTF-8.

    Examples
    --------
    >>> escape("cat/a.jpg")
    'cat/a.jpg'
    >>> print(escape("bad\\nskipped x.jpg: forged"))
    bad\\nskipped x.jpg: forged
    >>> escape(os.fsdecode(b"caf\\xe9.jpg"))
    'caf\\\\xe9.jpg'
    """
    if isinstance(text, (os.PathLike, bytes)):
        text = os.fsdecode(os.fspath(text))
    s = text if isinstance(text, str) else str(text)
    if s.isprintable():
        return s
    return "".join(ch if ch.isprintable() else _escape_char(ch) for ch in s)


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    if code in _ESCAPED_BYTES:
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
