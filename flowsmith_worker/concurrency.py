"""Concurrency keys: at most N runs of a flow per key in flight, the others waiting in turn.

Design (issue 14, point 5). ``Flow(..., concurrency_key=lambda ctx: ..., max_concurrent=N)``
(``@workflow(..., concurrency_key=..., max_concurrent=N)``): the key is computed
ONCE, at enqueue, from the run's input, and stored with the run
(``fs_flows.concurrency_key``); a key function that raises, or answers anything but
a name, refuses the run before anything is written. Keys are per flow: two flows
with a key "acme" limit their runs apart. The same idea as Hatchet's concurrency
expressions with the GROUP_ROUND_ROBIN strategy (queue the run, never cancel one)
and Oban Pro's partitioned global limits, kept in this database with no broker.

A run *in flight* holds a place under its key from the moment it gets one until
it ends (COMPLETED, FAILED for good, CANCELLED): a place is the run's, not a
step's, so a run that sleeps, waits for an event or retries keeps it. Each run's
place is ``fs_flows.key_turn``:

* NULL: it holds none and waits for none (no key, or it has ended);
* IN_FLIGHT (0): it holds one;
* a time > 0: it waits for one since then (database clock). Its first stage's
  nodes are BLOCKED (NodeStatus): never claimed, so it holds no slot, no thread
  and no lease, and nothing polls for it. Waiting runs get their places in
  (key_turn, id) order: the order they were enqueued.

One row per (flow, key) in fs_concurrency_keys holds the limit (the latest
enqueue's ``max_concurrent``) and is the lock that orders everything done to
the key's places: an enqueue, a retry, a run's end and a cancel each lock it
(an UPDATE or SELECT ... FOR UPDATE on PostgreSQL and MariaDB; SQLite has a
single writer) before counting, in the same transaction as their own write,
then give the free places (``places_free``) to the runs waiting longest: their
key_turn becomes IN_FLIGHT and their BLOCKED nodes PENDING (due at the time
they were enqueued for, so a delay or run_at is kept), and the queue's workers
are notified. So two enqueues, or an end and an enqueue, racing cannot put
more than N in flight, and an end (however it comes: a step's result, a
failure for good, a rescue that gives up, a cancel) hands its place on in the
transaction that records it. A cancel, or a failure that stops a run with
a parallel sibling still running, hands the place on at once: the step a worker
already holds runs to its end beside the next run (see README, "A cancel stops
what no worker holds").

A FAILED run retried (``flowsmith retry``, or enqueued again with its
tracking_id) takes a place again as a new arrival: in flight at once if one is
free, else waiting behind the runs already waiting (its key_turn is the time
of the retry).

What it costs. A run without a key: no statement more (its key_turn stays
NULL; the index on the keys' places is partial on PostgreSQL and SQLite, so it
has no entry there; MySQL has no partial indexes, so its insert adds one entry
to that index, which no later write of the run changes). A run with a key: its enqueue is
not PostgreSQL's one-statement insert but one transaction of about a dozen
short statements (the key row's insert-if-absent and its lock, the run and its
first stage, the run made to wait, then the key's count of runs in flight, the
runs waiting longest, and the update that starts them); the claim is unchanged;
its last step's write takes the general path instead of the set-based batch
(which cannot hand a place on): about five statements more (the key's lock, the
run's place dropped, the count, the next runs read and started). Measured:
`make bench BENCH_ARGS="--quick --backends postgresql"` counts the same round
trips (5.5) and statements (2.2) per step with and without this change.

Must never do I/O: the storage applies what is decided here.
"""

from __future__ import annotations

# fs_flows.key_turn of a run that holds a place under its key.
IN_FLIGHT = 0.0
# fs_concurrency_keys.concurrency_key and fs_flows.concurrency_key.
MAX_KEY_LENGTH = 255


def check_limit(flow_name: str, max_concurrent: object, has_key: bool) -> int | None:
    """``max_concurrent`` if it is a usable limit for a flow with (or without) a key."""
    if max_concurrent is None:
        if has_key:
            raise ValueError(
                f"flow {flow_name!r}: concurrency_key= needs max_concurrent=N, the runs "
                "per key in flight at once"
            )
        return None
    if not has_key:
        raise ValueError(
            f"flow {flow_name!r}: max_concurrent= needs concurrency_key=, a function of ctx "
            "(e.g. lambda ctx: ctx.data['customer_id']); for one limit over all runs, "
            "answer a constant"
        )
    if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int):
        raise TypeError(
            f"flow {flow_name!r}: max_concurrent={max_concurrent!r} must be a whole number"
        )
    if max_concurrent < 1:
        raise ValueError(f"flow {flow_name!r}: max_concurrent={max_concurrent} must be 1 or more")
    return max_concurrent


def places_free(limit: int, in_flight: int) -> int:
    """How many waiting runs get a place now (never negative: a lowered limit frees
    none until enough runs in flight end)."""
    return max(0, limit - in_flight)
