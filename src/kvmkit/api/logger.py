"""Structured logs: one JSON object per line (`ts`, `level`, `instance`, `msg`, and with
`show_log_origin` the `origin` file:line) to the logger path, through Python's logging so
every kvmkit module's records reach it. The path must exist (a file or FIFO), as with
Firecracker; `level` is Firecracker's (Error, Warning, Info, Debug, Trace, Off,
case-insensitive); `module` keeps only records of loggers under that name (e.g. kvmkit.api).
"""

from __future__ import annotations

import datetime
import json
import logging
import os

LEVELS = {
    "error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO,
    "debug": logging.DEBUG, "trace": logging.DEBUG - 5, "off": logging.CRITICAL + 10,
}  # fmt: skip
_NAMES = {logging.ERROR: "Error", logging.WARNING: "Warning", logging.INFO: "Info",
          logging.DEBUG: "Debug", logging.CRITICAL: "Error"}  # fmt: skip


class JsonLineHandler(logging.Handler):
    def __init__(self, fd: int, instance: str, show_level: bool, show_origin: bool) -> None:
        super().__init__()
        self.fd = fd
        self.instance = instance
        self.show_level = show_level
        self.show_origin = show_origin

    def emit(self, record: logging.LogRecord) -> None:
        try:
            ts = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            entry: dict[str, object] = {
                "ts": ts.isoformat(timespec="microseconds"),
                "instance": self.instance,
            }
            # The level is always there (it is structured data); show_level is accepted for
            # Firecracker compatibility and also puts it in front of the message.
            level = _NAMES.get(record.levelno, "Trace")
            entry["level"] = level
            if self.show_origin:
                entry["origin"] = f"{record.pathname}:{record.lineno}"
            entry["module"] = record.name
            msg = record.getMessage()
            if record.exc_info:
                msg += "\n" + logging.Formatter().formatException(record.exc_info)
            entry["msg"] = f"[{level}] {msg}" if self.show_level else msg
            os.write(self.fd, (json.dumps(entry) + "\n").encode())
        except Exception:  # a log sink that fails must not break the VMM
            pass

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
        super().close()


def install(
    path: str, *, level: str = "Info", instance: str = "anonymous-instance",
    show_level: bool = False, show_origin: bool = False, module: str | None = None,
) -> JsonLineHandler:  # fmt: skip
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC)
    import stat

    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
        os.close(fd)
        raise OSError(f"{path}: not a regular file or FIFO")
    handler = JsonLineHandler(fd, instance, show_level, show_origin)
    levelno = LEVELS[level.lower()]
    handler.setLevel(levelno)
    if module:
        handler.addFilter(logging.Filter(module))
    root = logging.getLogger("kvmkit")
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > levelno:
        root.setLevel(min(levelno, logging.CRITICAL))
    return handler
