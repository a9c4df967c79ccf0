"""Rate limits of steps: at most N starts per period across all workers, decided purely.

Design (issue 14, point 5). ``flow.step("send", fn, rate_limit="100/m")`` (and
``@step(rate_limit=...)``) allows at most 100 starts of that step per minute,
counted across every worker and every run of the flow, each attempt of a retried
step counting as a start. The units are ``s``, ``m`` and ``h``.

How others do it. Hatchet counts starts of a task per window against a key that
many tasks may share; Oban Pro limits a queue's starts per period (a sliding
window, per partition) in its producer records; River has no rate limit. All of
them count starts, not runs in flight (that is a concurrency limit), as here.

The algorithm is GCRA (the generic cell rate algorithm): a token bucket of N
tokens refilled at N per period, kept as one instant per bucket, its theoretical
arrival time ``tat``, so a refill needs no timer and no arithmetic on a token
count that drifts. Its burst, stated: up to N starts at once, then one every
period / N; in any window of ``w`` seconds at most ``N + N * w / period`` starts
(so at most 2N in one period, never more than N per period on average).

Where it is enforced. In the database, by the database clock, in one transaction
(SqlStorage.take_rate_token) that the executor asks for just before it calls the
step: it locks the bucket's row (fs_rate_limits, one per flow and step; the
rate itself stays code, as a timeout does) and asks ``decide`` here. Two workers
cannot both take the last token: the second waits for the first's row lock and
then sees the bucket as the first left it.

Why not in the claim. The claim is the hot path (storage/sql/claim.py): taking the
token there would make every claim find out which of its nodes are limited, and
a chained step (leased by the previous step's commit, never claimed) would need
the same again. Asked by the executor, unlimited steps pay nothing at all (not
one statement), chained steps are covered, and a limited step pays one short
transaction per start.

A start that finds no token is given back: its node returns to PENDING with
``run_after`` at its turn, and ``fs_nodes.wake_at`` says it waits for its rate
limit (`flowsmith status` and the dashboard show RATE_LIMITED, its turn as due). No worker
polls for it meanwhile: no claim sees it before its turn. Turns are handed out
one period / N apart (``line_end``): a hundred nodes refused at once do not all
come back at the next token's instant to be refused 99 times over, but each at its
own turn, which then finds its token (a fresh start waits behind the line, so a
waiting node is not overtaken). So a limited node is claimed about twice at
most, whatever the backlog.

Not yet (next):

* A limit per queue. Chosen shape: ``flowsmith queue-limit emails --rate 100/m``
  (and ``storage.set_queue_limit(queue=..., rate_limit=...)``), stored in
  fs_queues beside the queue's cap, because that is where an operator already
  sets a queue's limits: one value for every worker, changed without a deploy. A
  worker flag (``--queue-rate-limit``) could differ between the workers of one
  queue, and the bucket would then follow whichever started last. Its bucket
  would be a row here with flow_name '' (no flow has an empty name), taken the
  same way for every step of the queue.
* A key shared by several steps, or computed from ctx (Hatchet's dynamic keys).
* A refused start gives its attempt back as a parked sleep does (see
  parking.py): attempt numbers stay the lease's fencing token, never reused, so
  ATTEMPTS and ``ctx.attempt`` count the refusal (2/3 for a step refused once).

Must never do I/O (as progress.py): every input is a plain value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from flowsmith_worker.errors import InvalidFlowDefinition

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
# Instants are doubles of seconds since the epoch, about 2e-7 s apart today: a
# bucket's sums of intervals round, and must not refuse the last token of a burst.
_ROUNDING = 1e-6
_FORM = re.compile(r"\s*([+-]?\d+)\s*/\s*([a-zA-Z]+)\s*")


@dataclass(frozen=True)
class RateLimit:
    """At most ``count`` starts per ``period`` seconds (with the burst stated above)."""

    count: int
    period: float
    text: str  # as written, for messages and `flowsmith status`

    @property
    def interval(self) -> float:
        """Seconds between two starts at the steady rate: one token's refill."""
        return self.period / self.count

    @property
    def burst_tolerance(self) -> float:
        """How far ahead of now ``tat`` may be and still allow a start: N - 1 intervals,
        so a full bucket allows N starts at once."""
        return self.period - self.interval


def parse(text: object, *, step: str) -> RateLimit:
    """``"100/m"`` as a RateLimit; an InvalidFlowDefinition naming ``step`` otherwise."""
    if not isinstance(text, str):
        raise InvalidFlowDefinition(
            f"step {step!r}: rate_limit={text!r} must be a string such as '100/m'"
        )
    found = _FORM.fullmatch(text)
    if found is None or found.group(2) not in UNITS:
        raise InvalidFlowDefinition(
            f"step {step!r}: rate_limit={text!r} is not COUNT/UNIT: write for example "
            "'100/m' (UNIT is s, m or h: per second, minute or hour)"
        )
    count = int(found.group(1))
    if count < 1:
        raise InvalidFlowDefinition(
            f"step {step!r}: rate_limit={text!r} would never let it start: "
            "COUNT must be at least 1 (to pause a step, stop its workers instead)"
        )
    return RateLimit(count, UNITS[found.group(2)], text.strip())


@dataclass(frozen=True)
class Bucket:
    """A bucket's row: its theoretical arrival time, and the turn of its last waiter
    (both seconds since the epoch, database clock; 0 for a new bucket)."""

    tat: float
    line_end: float


@dataclass(frozen=True)
class Take:
    """A token was taken: the step starts; the bucket becomes ``bucket``."""

    bucket: Bucket


@dataclass(frozen=True)
class Wait:
    """No token: the node waits until ``until`` (its turn); the bucket becomes ``bucket``."""

    until: float
    bucket: Bucket


def decide(rate: RateLimit, bucket: Bucket, *, now: float, waited: bool) -> Take | Wait:
    """Whether a start at ``now`` may take a token. ``waited``: the node was refused
    before and given a turn, which has come; a node that did not wait queues behind
    those that do."""
    tat = max(bucket.tat, now)
    line_ahead = not waited and bucket.line_end > now + _ROUNDING
    if tat - now <= rate.burst_tolerance + _ROUNDING and not line_ahead:
        return Take(Bucket(tat + rate.interval, bucket.line_end))
    token_due = tat - rate.burst_tolerance
    turn = max(token_due, bucket.line_end + rate.interval)
    return Wait(turn, Bucket(bucket.tat, turn))
