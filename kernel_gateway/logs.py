"""Log setup: text or JSON lines, every record about a kernel carrying its id, no secrets."""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

__all__ = ["CONTROL_CHARS", "JSONFormatter", "TextFormatter", "configure_logging", "escape_controls", "log_request",
           "redact"]

_SECRET_QUERY = re.compile(r"(?i)([?&](?:token|access_token)=)[^&\s]*")
#: Characters that could forge or hide log lines: C0 controls but tab (newline, CR, ESC of ANSI sequences),
#: DEL, C1 controls, Unicode line/paragraph separators and lone surrogates.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r"}


def _escape_char(match: re.Match) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escape_controls(text: str, keep_newlines: bool = False) -> str:
    """``text`` with every character of :data:`CONTROL_CHARS` written as a visible escape (``\\n``, ``\\x1b``)."""
    if keep_newlines:
        return "\n".join(CONTROL_CHARS.sub(_escape_char, line) for line in text.split("\n"))
    return CONTROL_CHARS.sub(_escape_char, text)


def redact(text: str) -> str:
    """Blank out token query parameters in a URL or message."""
    return _SECRET_QUERY.sub(r"\1[redacted]", text)


class TextFormatter(logging.Formatter):
    """``[I 12:00:00.123 gateway] kernel=<id> message`` for terminals.

    One record is one line: control characters in the message and fields are escaped, so client input
    (a kernelspec name, a path) cannot forge or colour lines. Only a traceback keeps its line breaks.
    """

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        kernel = getattr(record, "kernel_id", None)
        prefix = f"[{record.levelname[0]} {stamp} {record.name}]"
        message = redact(record.getMessage())
        line = escape_controls(f"{prefix} kernel={kernel} {message}" if kernel else f"{prefix} {message}")
        if record.exc_info:
            line += "\n" + escape_controls(redact(self.formatException(record.exc_info)), keep_newlines=True)
        if record.stack_info:
            line += "\n" + escape_controls(self.formatStack(record.stack_info), keep_newlines=True)
        return line


class JSONFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, kernel_id when known."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key in ("kernel_id", "session_id", "user", "status", "method", "path", "duration_ms"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        # json.dumps escapes every control character and, with ensure_ascii, every non-ASCII one
        return json.dumps(entry, default=str)


def configure_logging(level: int | str, fmt: str) -> None:
    """Send the gateway's, tornado's and jupyter_client's loggers to stderr in ``fmt`` ("text" or "json")."""
    handler = logging.StreamHandler()
    handler.setLevel(level)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("GatewayApp", "tornado", "traitlets"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # library warnings (e.g. jupyter_client on an odd kernelspec directory) go through the same formatter
    logging.captureWarnings(True)


_access_log = logging.getLogger("kernel_gateway.access")


def log_request(handler: Any) -> None:
    """Tornado's access log: one line a request, token redacted; health probes only at debug level."""
    status = handler.get_status()
    level = logging.DEBUG if handler.request.path.endswith(("/healthz", "/readyz")) and status < 400 else logging.INFO
    if status >= 500:
        level = logging.ERROR
    duration = 1000.0 * handler.request.request_time()
    path = redact(handler.request.uri or "")
    _access_log.log(level, "%d %s %s %.1fms", status, handler.request.method, path, duration,
                    extra={"status": status, "method": handler.request.method, "path": path,
                           "duration_ms": round(duration, 1)})
