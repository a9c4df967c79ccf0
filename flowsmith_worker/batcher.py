"""Group commit: the outcomes of every step that finished meanwhile, in one transaction.

A step thread hands its outcome to ``CompletionBatcher.write`` and waits until
it has committed. No thread of its own does the writing: the first writer to
find no write on its way becomes the leader and writes, with one
``Storage.complete_batch`` (one commit, so one WAL flush), its own outcome and
everything queued behind it. Outcomes that arrive while a batch is being
written queue up; when the batch returns, the leader answers its writers and
makes the oldest queued writer the next leader, which writes the next batch at
once. No timer, so a lone step waits for nobody, and under load the batches
grow by themselves while a commit is on its way ("natural batching").

Leading from the writers' own threads, rather than from a flusher thread, saves
a thread hand-off per batch: a lone step writes its own outcome with no wake-up
at all, and each batch costs one wake-up per other writer (its answer, or its
turn to lead). Each wake-up is a plain lock released, not a Future's condition.

A step's slot stays taken until its outcome has committed: a crash before
then leaves the node RUNNING, and it is rescued when its lease expires. So a
finished step is never lost and never runs twice because of the batching.

Must never answer a writer before its outcome has committed (or failed), write one
batch in more than one transaction, wait on a timer, or let one item its run cannot
take fail the others (the batch is then written item by item).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from flowsmith_worker.errors import DatabaseUnavailable
from flowsmith_worker.log import get_logger
from flowsmith_worker.storage.base import Chain, Finished, Storage, Written

# Bounds one transaction's size (and how long it holds its runs' locks).
MAX_BATCH = 256
log = get_logger(__name__)


class _Pending:
    """One writer's outcome, and the lock it waits on: released once its write is
    answered, or once it is its turn to lead."""

    __slots__ = ("answer", "error", "finished", "lead", "ready", "settled")

    def __init__(self, finished: Finished) -> None:
        self.finished = finished
        self.answer: Written | None = None
        self.error: BaseException | None = None
        self.settled = False
        self.lead = False
        self.ready = threading.Lock()
        self.ready.acquire()  # held until someone answers this writer or makes it lead

    def settle(self, answer: Written | None, error: BaseException | None = None) -> None:
        if not self.settled:
            self.answer, self.error, self.settled = answer, error, True
            self.ready.release()

    def result(self) -> Written:
        if self.error is not None:
            raise self.error
        assert self.answer is not None
        return self.answer


class CompletionBatcher:
    """Writes queued outcomes in batches, each written by one of the waiting writers."""

    def __init__(
        self,
        storage: Storage,
        chain: Callable[[], Chain | None] = lambda: None,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self.storage = storage
        # Asked at each batch, so a worker that starts stopping chains no further.
        self.chain = chain
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: deque[_Pending] = deque()  # never empty while _writing is False
        self._writing = False  # a leader is writing a batch, or has been told to
        self._idle = threading.Condition(self._lock)
        self._closed = False

    @property
    def queued(self) -> int:
        """Outcomes waiting for a batch (the one being written not counted)."""
        with self._lock:
            return len(self._queue)

    def write(self, finished: Finished) -> Written:
        """Write ``finished`` with whatever else is queued; return once it has committed.

        Raises what complete_batch raised for it (DatabaseUnavailable: the caller
        tries again, marking the write as a replay).
        """
        pending = _Pending(finished)
        with self._lock:
            if self._closed:
                # A step that outlived its worker's shutdown: write it alone.
                return self.storage.complete_batch(finished=[finished], chain=None)[0]
            self._queue.append(pending)
            leads = not self._writing
            self._writing = True
        if not leads:
            pending.ready.acquire()  # answered, or our turn to lead
            if not pending.lead:
                return pending.result()
        self._lead()
        return pending.result()

    def close(self, wait: float = 1.0) -> None:
        """Later writes go alone; wait until what is queued has been written.

        Waits at most ``wait`` seconds: a worker shuts down after its steps'
        outcomes committed, so the queue is empty then unless the database is
        away, and the nodes of outcomes not written keep their leases.
        """
        deadline = time.monotonic() + wait
        with self._lock:
            self._closed = True
            while self._writing and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)

    def _lead(self) -> None:
        """Write the oldest queued outcomes (ours among them), then pass the lead on."""
        with self._lock:
            count = min(len(self._queue), self.max_batch)
            batch = [self._queue.popleft() for _ in range(count)]
        try:
            self._flush(batch)
        except BaseException as exc:  # our own bug: no writer of the batch may wait forever
            for pending in batch:
                pending.settle(None, exc)
            raise
        finally:
            self._pass_lead()

    def _pass_lead(self) -> None:
        with self._lock:
            if not self._queue:
                self._writing = False
                self._idle.notify_all()
                return
            following = self._queue[0]
            following.lead = True
        following.ready.release()

    def _flush(self, batch: Sequence[_Pending]) -> None:
        try:
            written = self.storage.complete_batch(
                finished=[p.finished for p in batch], chain=self.chain()
            )
        except DatabaseUnavailable as exc:
            # Nothing committed (or the answer was lost): each writer decides
            # whether to try again, as it would after a write of its own.
            for pending in batch:
                pending.settle(None, exc)
            return
        except BaseException as exc:
            if len(batch) == 1:
                batch[0].settle(None, exc)
                return
            # One item the batch could not take (a corrupt row of its run): write
            # each alone, so only that one fails.
            log.warning("batch.split", size=len(batch), error=str(exc))
            for pending in batch:
                self._flush([pending])
            return
        for pending, answer in zip(batch, written, strict=True):
            pending.settle(answer)
