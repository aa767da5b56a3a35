"""Base class for objects that own one libmasa handle.

Each handle is destroyed exactly once: by close(), by leaving a ``with``
block, or -- as the last resort -- by a weakref.finalize callback when the
object is garbage collected or the interpreter exits.  The finalizer holds
strong references to everything the C object points into (its context, the
numpy arrays it wraps, the dictionaries a layer uses), so none of those can be
freed while the C side may still use them.

Threads: ctypes releases the GIL during every C call, so each handle has a
readers/writer lock. Calls that only read an object (forward, backward,
decode, size queries) hold it shared and run concurrently; calls that
change or destroy it (set_*, init_*, weight policy, refresh, close) hold it
exclusively and wait for the running readers. A call that uses several
objects takes their locks in one global order (creation order), so two
calls can never wait for each other.

fork(): the child has only the forking thread, so locks held by other
threads at that moment are replaced by fresh ones in the child.
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref

from .errors import ClosedHandleError

_serials = itertools.count(1)
_fork_generation = 0


def _after_fork_in_child():
    global _fork_generation
    _fork_generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class RWLock:
    """Readers/writer lock, reentrant per thread (a thread holding it may
    take it again in either mode, except for taking the write side while
    holding only the read side). Writers go before new readers, but when a
    writer leaves, the readers already waiting go before the next writer:
    neither a stream of writers (a policy toggled in a loop) nor a stream of
    readers starves the other side. The uncontended path is one plain mutex
    round trip."""

    def __init__(self):
        self._reset()

    def _reset(self):
        self._generation = _fork_generation
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._readers = {}  # thread ident -> depth
        self._writer = None
        self._write_depth = 0
        self._writers_waiting = 0
        self._readers_waiting = 0
        self._read_turn = False  # the waiting readers go before the next writer
        self._sleepers = 0  # threads in self._cond.wait()

    def _wait(self):
        self._sleepers += 1
        try:
            self._cond.wait()
        finally:
            self._sleepers -= 1

    def acquire_read(self):
        if self._generation != _fork_generation:
            self._reset()  # the threads that held it are not in this process
        me = threading.get_ident()
        with self._mutex:
            readers = self._readers
            if me not in readers and self._writer != me:
                if self._writer is not None or (self._writers_waiting and not self._read_turn):
                    self._readers_waiting += 1
                    try:
                        while self._writer is not None or (self._writers_waiting
                                                           and not self._read_turn):
                            self._wait()
                    finally:
                        self._readers_waiting -= 1
                        if not self._readers_waiting and self._read_turn:
                            self._read_turn = False
                            if self._sleepers:  # a writer may wait for the turn to end
                                self._cond.notify_all()
            readers[me] = readers.get(me, 0) + 1

    def release_read(self):
        me = threading.get_ident()
        with self._mutex:
            depth = self._readers.get(me)
            if depth is None:
                return  # taken before a fork; this lock is the child's own
            if depth > 1:
                self._readers[me] = depth - 1
                return
            del self._readers[me]
            if not self._readers and self._sleepers:
                self._cond.notify_all()

    def acquire_write(self):
        if self._generation != _fork_generation:
            self._reset()
        me = threading.get_ident()
        with self._mutex:
            if self._writer == me:
                self._write_depth += 1
                return
            if me in self._readers:
                raise RuntimeError("libmasa binding: a thread reading an object cannot change it "
                                   "in the same call (lock upgrade)")
            self._writers_waiting += 1
            try:
                while self._writer is not None or self._readers or self._read_turn:
                    self._wait()
            finally:
                self._writers_waiting -= 1
            self._writer = me
            self._write_depth = 1

    def release_write(self):
        with self._mutex:
            if self._writer != threading.get_ident():
                return  # taken before a fork; this lock is the child's own
            self._write_depth -= 1
            if self._write_depth == 0:
                self._writer = None
                if self._readers_waiting:
                    self._read_turn = True
                if self._sleepers:
                    self._cond.notify_all()


class locked:
    """Context manager holding the locks of the handles in `reads` (shared)
    and `writes` (exclusive), taken in creation order; a handle in both is
    written."""

    __slots__ = ("_order", "_taken")

    def __init__(self, reads=(), writes=()):
        mode = {}
        for h in reads:
            if h is not None:
                mode.setdefault(h._serial, (h, False))
        for h in writes:
            if h is not None:
                mode[h._serial] = (h, True)
        self._order = [mode[k] for k in sorted(mode)]
        self._taken = 0

    def __enter__(self):
        try:
            for h, write in self._order:
                if write:
                    h._lock.acquire_write()
                else:
                    h._lock.acquire_read()
                self._taken += 1
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        while self._taken:
            self._taken -= 1
            h, write = self._order[self._taken]
            if write:
                h._lock.release_write()
            else:
                h._lock.release_read()
        return False


def _destroy(destroy_fn, ptr, keepalive):
    try:
        destroy_fn(ptr)
    finally:
        # Drop the references only once the C object is gone.
        keepalive.clear()


class Handle:
    """An owned libmasa object (context, dictionary, table or layer)."""

    _finalizer = None
    _ptr = None

    def _init_handle(self, ptr, destroy_fn, keepalive):
        """ptr: the ctypes handle; destroy_fn: the C destroy function;
        keepalive: a list (or dict) of objects kept alive until destroy."""
        self._ptr = ptr
        self._keepalive = keepalive
        self._finalizer = weakref.finalize(self, _destroy, destroy_fn, ptr, keepalive)

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        self._serial = next(_serials)
        self._lock = RWLock()
        return self

    @property
    def closed(self) -> bool:
        return self._finalizer is None or not self._finalizer.alive

    def _handle(self):
        """The C handle; raises ClosedHandleError once closed."""
        if self.closed:
            raise ClosedHandleError(f"{type(self).__name__} is closed")
        return self._ptr

    def _reading(self, *others):
        """Shared locks of this handle and `others` for one call."""
        return locked(reads=(self,) + others)

    def _writing(self, *reads):
        """The exclusive lock of this handle (and shared ones of `reads`)."""
        return locked(reads=reads, writes=(self,))

    def _check_close(self):
        """Raises (HandleInUseError) when the object may not be closed."""

    def close(self) -> None:
        """Destroy the C object now. Safe to call more than once. Waits for
        calls running on it in other threads."""
        with self._writing():
            if self.closed:
                return
            self._check_close()
            self._finalizer()  # runs the destroy function at most once

    def __enter__(self):
        self._handle()
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # A copy would share the C handle with an object that may destroy it.
    def __copy__(self):
        raise TypeError(f"{type(self).__name__} objects cannot be copied")

    def __deepcopy__(self, memo):
        raise TypeError(f"{type(self).__name__} objects cannot be copied")

    def __reduce__(self):
        raise TypeError(f"{type(self).__name__} objects cannot be pickled")
