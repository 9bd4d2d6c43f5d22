"""When the SDK retries a failed call (UNAVAILABLE, idempotent calls only) and how long it waits, within a deadline."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc

from .errors import InstGenIEError


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for UNAVAILABLE, and opt-in RetryInfo-paced retries of RESOURCE_EXHAUSTED.

    Only calls that cannot run twice are ever retried (reads, and writes carrying a request id); everything
    else surfaces at once, because the first attempt may have done its work before the connection broke.
    """

    max_retries: int = 4
    initial_backoff: float = 0.25
    max_backoff: float = 8.0
    multiplier: float = 2.0
    retry_resource_exhausted: bool = False

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Seconds before retry number `retry` (0 = the first retry): half to all of the capped exponential.

        The jitter spreads clients that failed together (a gateway restart) so they do not return together.
        """
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier ** retry)
        return cap * (0.5 + 0.5 * rng.random())

    def delay(self, err: InstGenIEError, retry: int, idempotent: bool, rng: random.Random) -> float | None:
        """Seconds to wait before retrying after `err`, or None when the error must reach the caller."""
        if not idempotent or retry >= self.max_retries:
            return None
        if err.code == grpc.StatusCode.UNAVAILABLE:
            return self.backoff(retry, rng)
        if (err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and self.retry_resource_exhausted
                and err.retry_after is not None):
            # Honour the server's hint, plus a little spread so rejected clients do not all come back at once.
            return err.retry_after + min(1.0, 0.2 * err.retry_after) * rng.random()
        return None


class Deadline:
    """The absolute end of one logical call, shared by its attempts (a retry never extends it)."""

    def __init__(self, seconds: float):
        if seconds <= 0:
            raise ValueError(f"a timeout must be positive, not {seconds!r}")
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())

    def capped(self, seconds: float) -> Deadline:
        """A deadline that ends after `seconds` or with this one, whichever is first."""
        return Deadline(max(1e-3, min(seconds, self.remaining())))
