"""Service logs: one line per event, naming the service and the request id of the call being served."""
from __future__ import annotations

import contextvars
import logging
import sys

#: set by each handler for the duration of its call; asyncio tasks inherit it, so every line logged on a
#: request's behalf carries its id
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("instgenie_request_id", default="-")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def setup_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s {service} [%(request_id)s] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
