"""Secrets never reach a log line or an error message: passwords in URLs and DSNs, tokens in query
strings and Authorization headers, and the values of the secret settings themselves."""

from __future__ import annotations

import logging
import re
from typing import Callable, Iterable, List

MASK = "***"
_PATTERNS = [
    # scheme://user:password@host
    (re.compile(r"(?P<keep>\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^@\s]*(?=@)"), MASK),
    # ?token=...&password=... in a URL, password=... in a libpq key/value DSN
    (
        re.compile(
            r"(?P<keep>(?:[?&;\s]|^)(?:password|passwd|pwd|token|access_token|secret|api_key|apikey|key|sig|signature)=)[^&\s;]*",
            re.IGNORECASE,
        ),
        MASK,
    ),
    # Authorization: Bearer <token> / Basic <credentials>
    (re.compile(r"(?P<keep>\b(?:Bearer|Basic)\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE), MASK),
]
_known_secrets: List[str] = []


def remember_secrets(values: Iterable[str]) -> None:
    """Mask these exact values (the secret settings) wherever they appear."""
    for value in values:
        if value and value not in _known_secrets:
            _known_secrets.append(value)
    _known_secrets.sort(key=len, reverse=True)


def _keep_then(mask: str) -> Callable[[re.Match[str]], str]:
    """A replacement that keeps a match's ``keep`` group and puts ``mask`` in place of the rest."""

    def replace(match: re.Match[str]) -> str:
        return match.group("keep") + mask

    return replace


def redact(text: str) -> str:
    """``text`` with every password, token and known secret replaced by ***."""
    for pattern, mask in _PATTERNS:
        text = pattern.sub(_keep_then(mask), text)
    for secret in _known_secrets:
        text = text.replace(secret, MASK)
    return text


class RedactingLogRecord(logging.LogRecord):
    """A log record whose message (arguments included) is redacted when it is formatted."""

    def getMessage(self) -> str:  # noqa: N802 - logging's name
        return redact(super().getMessage())


def redact_log_records() -> None:
    """Make every log record of this process redact its message (Faust's and ours alike)."""
    logging.setLogRecordFactory(RedactingLogRecord)
