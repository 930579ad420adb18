"""Logging. Each module logs to its own logger under "splitfuse" (splitfuse.frontend.router, splitfuse.worker.main,
...), so a level or a handler can be set for the whole package or one area of it. Lines about one request
carry its id (in the text, and as `request_id` on the record).

By default the "splitfuse" logger writes plain lines to stderr at INFO: the progress a person starting a
server wants to see. SPLITFUSE_LOG_LEVEL names another level (`--log-level` sets it, and worker processes
inherit it), SPLITFUSE_LOG_FORMAT=json writes one JSON object per line, and SPLITFUSE_CONFIGURE_LOGGING=0
leaves the handlers to the application: the records then propagate to its root logger."""
import json
import logging
import os
import sys

LEVELS = ("debug", "info", "warning", "error")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"time": record.created, "level": record.levelname.lower(), "logger": record.name,
                "message": record.getMessage()}
        if hasattr(record, "request_id"):
            line["request_id"] = record.request_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure() -> None:
    """Give the "splitfuse" logger its handler, once per process, unless the application does that."""
    logger = logging.getLogger("splitfuse")
    if os.environ.get("SPLITFUSE_CONFIGURE_LOGGING", "1") == "0" or logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if os.environ.get("SPLITFUSE_LOG_FORMAT") == "json"
                         else logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("SPLITFUSE_LOG_LEVEL", "info").upper())
    logger.propagate = False


def set_level(level: str) -> None:
    """This process's level, and its worker processes' (they read SPLITFUSE_LOG_LEVEL as they start)."""
    os.environ["SPLITFUSE_LOG_LEVEL"] = level
    logging.getLogger("splitfuse").setLevel(level.upper())
