"""Text that came from outside the daemon, made safe to show and to pass on.

A worker controls some of the words the daemon repeats: the status line its
HTTP probe answered, an exec probe's or a preflight's output, a certificate's
subject. Those words reach reports, console logs and systemd's ``STATUS=``.
A newline there could add a line to a notify datagram (``WATCHDOG=trigger``,
``FDSTOREREMOVE=1``, ``MAINPID=``: systemd takes them from the root daemon),
and an ANSI escape could rewrite an operator's terminal. So such text passes
through ``printable`` once, where it enters.
"""

from __future__ import annotations

import re

# ANSI/VT100 escape sequences: CSI (ESC [ ... final byte), OSC (ESC ] ... BEL or
# ESC \), and the two-byte ESC forms. Removed whole, so no fragment is left.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC
    r"|\x1b[@-Z\\-_]"  # two-byte escapes
    r"|\x9b[0-?]*[ -/]*[@-~]"  # 8-bit CSI
)
# C0 controls, DEL and C1 controls; tab and newline are decided by the caller.
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_LINE_BREAKS = re.compile(r"[\t\n]")
# Unicode line and paragraph separators: str.splitlines() breaks on them.
_SEPARATORS = re.compile(r"[\u2028\u2029\x85]")


def printable(text: str, *, lines: bool = False, limit: int | None = None) -> str:
    """``text`` without escape sequences and control characters.

    Args:
        text: words from outside (a worker's answer or output).
        lines: keep newlines and tabs (multi-line command output); otherwise
            each becomes a space and the result is one line.
        limit: cut the result to at most this many characters (``…`` ends it).
    """
    out = _ESCAPES.sub("", text)
    out = _CONTROLS.sub("?", out.replace("\r\n", "\n").replace("\r", "\n"))
    out = _SEPARATORS.sub(" ", out)
    if not lines:
        out = _LINE_BREAKS.sub(" ", out)
    if limit is not None and len(out) > limit:
        out = out[: max(limit - 1, 0)] + "…"
    return out


def has_controls(text: str) -> bool:
    """Whether ``text`` holds a character that would break a line-based protocol."""
    return bool(_CONTROLS.search(text) or _LINE_BREAKS.search(text) or _SEPARATORS.search(text))
