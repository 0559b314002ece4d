"""Rate-limited logging, so that a hostile peer cannot flood the log."""

import logging
from time import monotonic

__all__ = ["RateLimitedLogger"]


class RateLimitedLogger:
    """Logs each kind of recurring event at most once per ``interval`` seconds.

    A record names how many events of its kind were suppressed since the previous one.
    """

    def __init__(self, logger: logging.Logger, interval: float):
        self.logger = logger
        self.interval = interval
        self._next_allowed: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, kind: str, message: str, *args) -> bool:
        """Log ``message % args`` unless ``kind`` was logged less than ``interval`` ago."""
        now = monotonic()
        if now < self._next_allowed.get(kind, 0.0):
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False
        self._next_allowed[kind] = now + self.interval
        suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            message += " (%d similar events suppressed)"
            args = (*args, suppressed)
        self.logger.log(level, message, *args)
        return True

    def warning(self, kind: str, message: str, *args) -> bool:
        return self.log(logging.WARNING, kind, message, *args)
