"""A readers–writer lock: the guard between compiled train steps (readers of an EWC's state)
and a consolidation's commit (its writer).

Any number of threads hold it shared at once; one holds it exclusively, alone.  A writer
that waits stops new readers from entering (a loop of train steps cannot starve a
commit); a thread that already holds it shared may take it shared again (nested steps never
wait for a writer that waits for them).  Neither mode is re-entrant across modes: a thread
holding it shared must not ask for it exclusively, nor the other way round.
"""
import contextlib
import threading

__all__ = ["ReadersWriterLock"]


class ReadersWriterLock:
    """``with lock.shared(): ...`` (readers) and ``with lock.exclusive(): ...`` (a writer)."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = {}             # thread id -> how many times it holds the lock shared
        self._writer = None            # the thread id holding it exclusively
        self._writers_waiting = 0

    @contextlib.contextmanager
    def shared(self):
        me = threading.get_ident()
        with self._cond:
            if me not in self._readers:
                while self._writer is not None or self._writers_waiting:
                    self._cond.wait()
            self._readers[me] = self._readers.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._readers[me] -= 1
                if not self._readers[me]:
                    del self._readers[me]
                    if not self._readers:
                        self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer is not None or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
                self._cond.notify_all()      # readers held back by a writer that gave up
            self._writer = threading.get_ident()
        try:
            yield
        finally:
            with self._cond:
                self._writer = None
                self._cond.notify_all()
