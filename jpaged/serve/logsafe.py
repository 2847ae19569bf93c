"""Log lines without raw client-controlled control characters.

Paths, field names and messages that come from clients can carry newlines
or terminal escapes, which would forge log lines or rewrite a terminal.
`ControlCharFilter` rewrites a record's message with every control character
(C0, DEL, C1, and the Unicode line and paragraph separators) shown as an
escape; `get_logger` returns a logger that has it.
"""

from __future__ import annotations

import logging
import re

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256
                        else f"\\u{ord(m.group()):04x}", text)


class ControlCharFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is logging's to report
            return True
        clean = escape_controls(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


_FILTER = ControlCharFilter()


def get_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` with the control-character filter on it."""
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger
