"""Group commit: the outcomes of every step that finished meanwhile, in one transaction.

A step thread hands its outcome to ``CompletionBatcher.write`` and waits; one
flusher thread per worker takes everything queued, writes it with one
``Storage.complete_batch`` (one commit, so one WAL flush, for the lot) and
answers each waiting thread. It sends the next batch as soon as the previous
one returns: no timer, so a lone step waits for nobody, and under load the
batches grow by themselves while a commit is on its way ("natural batching").

A step's slot stays taken until its outcome has committed: a crash before
then leaves the node RUNNING, and it is rescued when its lease expires. So a
finished step is never lost and never runs twice because of the batching.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from flowsmith_worker.errors import DatabaseUnavailable
from flowsmith_worker.log import get_logger
from flowsmith_worker.storage.base import Chain, Finished, Storage, Written

# Bounds one transaction's size (and how long it holds its runs' locks).
MAX_BATCH = 256
log = get_logger("flowsmith.batcher")


@dataclass
class _Pending:
    finished: Finished
    answer: Future[Written] = field(default_factory=Future)


class CompletionBatcher:
    """One flusher thread writing queued outcomes in batches; started on first use."""

    def __init__(
        self,
        storage: Storage,
        chain: Callable[[], Chain | None] = lambda: None,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self.storage = storage
        # Asked at each flush, so a worker that starts stopping chains no further.
        self.chain = chain
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

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
            self._start()
            self._queue.put(pending)
        return pending.answer.result()

    def close(self, wait: float = 1.0) -> None:
        """End the flusher after what is queued; later writes go alone.

        Waits at most ``wait`` seconds: a worker shuts down after its steps'
        outcomes committed, so the queue is empty then unless the database is
        away, and the nodes of outcomes not written keep their leases.
        """
        with self._lock:
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._queue.put(None)
        if thread is not None:
            thread.join(wait)

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="flowsmith-commit", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            closing = False
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    closing = True
                    break
                batch.append(more)
            self._flush(batch)
            if closing:
                return

    def _flush(self, batch: list[_Pending]) -> None:
        try:
            written = self.storage.complete_batch(
                finished=[p.finished for p in batch], chain=self.chain()
            )
        except DatabaseUnavailable as exc:
            # Nothing committed (or the answer was lost): each writer decides
            # whether to try again, as it would after a write of its own.
            for pending in batch:
                pending.answer.set_exception(exc)
            return
        except BaseException as exc:
            if len(batch) == 1:
                batch[0].answer.set_exception(exc)
                return
            # One item the batch could not take (a corrupt row of its run): write
            # each alone, so only that one fails.
            log.warning("batch.split", size=len(batch), error=str(exc))
            for pending in batch:
                self._flush([pending])
            return
        for pending, answer in zip(batch, written, strict=True):
            pending.answer.set_result(answer)
