"""The retry policy on its own: which errors are retried, how long the backoff is, and the deadline budget."""
from __future__ import annotations

import random

import grpc
import pytest

from instgenie.client.errors import error_from_status
from instgenie.client.retry import Deadline, RetryPolicy
from instgenie.status import StatusInfo


def err(code: grpc.StatusCode, retry_after: float | None = None):
    return error_from_status(StatusInfo(code, "x", retry_after=retry_after))


def test_backoff_grows_exponentially_within_jitter_bounds():
    policy = RetryPolicy(initial_backoff=0.5, max_backoff=3.0, multiplier=2.0)
    rng = random.Random(7)
    for retry, cap in enumerate([0.5, 1.0, 2.0, 3.0, 3.0]):
        delays = [policy.backoff(retry, rng) for _ in range(200)]
        assert all(cap / 2 <= d <= cap for d in delays)
        assert max(delays) - min(delays) > cap / 4  # jittered, not one fixed value


def test_only_unavailable_on_idempotent_calls_is_retried():
    policy, rng = RetryPolicy(), random.Random(0)
    assert policy.delay(err(grpc.StatusCode.UNAVAILABLE), 0, True, rng) is not None
    assert policy.delay(err(grpc.StatusCode.UNAVAILABLE), 0, False, rng) is None
    for code in grpc.StatusCode:
        if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.OK):
            assert policy.delay(err(code, retry_after=1.0), 0, True, rng) is None, code


def test_retries_stop_after_max_retries():
    policy, rng = RetryPolicy(max_retries=2), random.Random(0)
    assert policy.delay(err(grpc.StatusCode.UNAVAILABLE), 1, True, rng) is not None
    assert policy.delay(err(grpc.StatusCode.UNAVAILABLE), 2, True, rng) is None
    assert RetryPolicy(max_retries=0).delay(err(grpc.StatusCode.UNAVAILABLE), 0, True, rng) is None


def test_resource_exhausted_waits_for_retry_info_only_when_opted_in():
    rng = random.Random(0)
    opted = RetryPolicy(retry_resource_exhausted=True)
    delay = opted.delay(err(grpc.StatusCode.RESOURCE_EXHAUSTED, retry_after=2.0), 0, True, rng)
    assert 2.0 <= delay <= 2.4
    # No RetryInfo: a limit the server gave no time for (or gRPC's own "message too large") is not retried.
    assert opted.delay(err(grpc.StatusCode.RESOURCE_EXHAUSTED), 0, True, rng) is None
    assert opted.delay(err(grpc.StatusCode.RESOURCE_EXHAUSTED, retry_after=2.0), 0, False, rng) is None
    assert RetryPolicy().delay(err(grpc.StatusCode.RESOURCE_EXHAUSTED, retry_after=2.0), 0, True, rng) is None


def test_deadline():
    deadline = Deadline(100.0)
    assert 0 < deadline.remaining() <= 100.0
    assert deadline.capped(5.0).remaining() <= 5.0
    assert deadline.capped(1e6).remaining() <= 100.0
    with pytest.raises(ValueError, match="positive"):
        Deadline(0)
