"""Configure structlog once: JSON lines when not on a terminal, readable columns on one."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from loadwarden.worker._text import clean

# structlog imports rich as it is imported (rich.traceback, rich.pretty, pygments: ~30 ms of
# a command's start, measured with -X importtime), only for its console renderer's
# tracebacks. Off a terminal our logs are JSON lines, which never use it: when stderr is not
# a terminal and structlog is imported here first, rich is hidden from that one import
# (None in sys.modules makes `import rich` fail, which structlog handles) and visible again
# right after (the CLI's human output uses it). A console renderer set up later on another
# stream that is a terminal then prints plain tracebacks, not rich ones.
_ON_TERMINAL = sys.stderr is not None and sys.stderr.isatty()
_HIDE_RICH = not ({"structlog", "rich"} & sys.modules.keys() or _ON_TERMINAL)
if _HIDE_RICH:
    sys.modules["rich"] = None  # type: ignore[assignment]
try:
    import structlog
finally:
    if _HIDE_RICH:
        del sys.modules["rich"]

_configured = False


def _escape_strings(
    _logger: object, _name: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """Show control characters in string values as escapes (the console renderer prints raw)."""
    return {k: clean(v) if isinstance(v, str) and k != "exception" else v for k, v in event.items()}


def configure_logging(
    level: str = "info",
    *,
    json: bool | None = None,
    stream: TextIO | None = None,
) -> None:
    """Set up structlog (and route arq's stdlib logs through the same level). Idempotent."""
    global _configured
    out = stream or sys.stderr
    use_json = (not out.isatty()) if json is None else json
    # JSON escapes control characters itself; on a terminal, a source or an error message
    # holding ANSI/OSC escapes would otherwise reach the operator's terminal raw.
    tail: list[structlog.typing.Processor] = (
        [structlog.processors.JSONRenderer()]
        if use_json
        else [_escape_strings, structlog.dev.ConsoleRenderer()]
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            *tail,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(
        level=max(logging.getLevelNamesMapping()[level.upper()], logging.WARNING),
        stream=out,
        force=not _configured,
    )
    _configured = True
