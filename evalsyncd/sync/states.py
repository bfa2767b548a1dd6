"""A destination's lifecycle and its retry policy: pure, with the clock and randomness injected.

States and their edges (every other edge is a bug and raises)::

    HEALTHY --transient error--> BACKOFF --pass succeeded--> HEALTHY
       |                          |  (another transient error: stays, waits longer)
       |                   permanent error
       |                          v
       +----permanent error----> PARKED --retry succeeded--> HEALTHY
                                  (a retry meeting a transient error: BACKOFF)

A failure does not sleep: :func:`after_failure` returns the next state and the
*time* of the next attempt (``Destination.retry_at``), which the next pass waits
for (a stop ends the wait at once).
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from evalsyncd.config import RetrySettings

__all__ = [
    "EDGES",
    "DestinationState",
    "Retry",
    "TransitionError",
    "after_failure",
    "backoff_delay",
    "check_transition",
]


class DestinationState(enum.Enum):
    """Where a destination is in its lifecycle."""

    HEALTHY = "healthy"
    BACKOFF = "backoff"
    PARKED = "parked"


EDGES: dict[DestinationState, frozenset[DestinationState]] = {
    DestinationState.HEALTHY: frozenset({DestinationState.BACKOFF, DestinationState.PARKED}),
    # a permanent error while backing off parks
    DestinationState.BACKOFF: frozenset({DestinationState.HEALTHY, DestinationState.PARKED}),
    # the periodic retry of a parked destination: success, or a transient error
    DestinationState.PARKED: frozenset({DestinationState.HEALTHY, DestinationState.BACKOFF}),
}
"""The allowed transitions, ``old -> {new, ...}``; staying in a state is not a transition."""


class TransitionError(RuntimeError):
    """A transition that :data:`EDGES` does not allow (a bug in the caller)."""


def check_transition(old: DestinationState, new: DestinationState) -> None:
    """Raise :class:`TransitionError` unless ``old -> new`` is an edge of :data:`EDGES`."""
    if new not in EDGES[old]:
        raise TransitionError(f"destination state {old.value} -> {new.value} is not allowed")


def backoff_delay(failures: int, retry: RetrySettings, rng: random.Random) -> float:
    """Seconds to wait after ``failures`` consecutive transient failures (>= 1).

    Exponential with "equal jitter": the cap ``min(max_backoff_s,
    initial_backoff_s * 2**(failures-1))`` is halved, and a uniform random part
    of the other half is added, so waits never collapse to zero and never
    exceed ``max_backoff_s``.
    """
    exponent = min(max(failures - 1, 0), 60)
    cap = min(retry.max_backoff_s, retry.initial_backoff_s * (2.0**exponent))
    return cap / 2 + rng.uniform(0, cap / 2)


@dataclass(frozen=True, slots=True)
class Retry:
    """What follows a failed pass."""

    state: DestinationState
    """BACKOFF (transient) or PARKED (permanent)."""
    at: float
    """Monotonic time of the next attempt, seconds."""
    delay_s: float
    """``at`` minus the time of the failure, seconds."""


def after_failure(
    failures: int, permanent: bool, now: float, retry: RetrySettings, rng: random.Random
) -> Retry:
    """The next state and attempt time after the ``failures``-th consecutive failure.

    Args:
        failures: consecutive failed passes, this one included (>= 1).
        permanent: the error was permanent (access denied, no such bucket).
        now: the monotonic time of the failure, seconds.
        retry: the destination's retry settings.
        rng: randomness for the jitter.
    """
    if permanent:
        delay_s = retry.parked_retry_s
        state = DestinationState.PARKED
    else:
        delay_s = backoff_delay(failures, retry, rng)
        state = DestinationState.BACKOFF
    return Retry(state, now + delay_s, delay_s)
