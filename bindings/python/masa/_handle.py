"""Base class for objects that own one libmasa handle.

Each handle is destroyed exactly once: by close(), by leaving a ``with``
block, or -- as the last resort -- by a weakref.finalize callback when the
object is garbage collected or the interpreter exits.  The finalizer holds
strong references to everything the C object points into (its context, the
numpy arrays it wraps, the dictionaries a layer uses), so none of those can be
freed while the C side may still use them.
"""

from __future__ import annotations

import weakref

from .errors import ClosedHandleError


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

    @property
    def closed(self) -> bool:
        return self._finalizer is None or not self._finalizer.alive

    def _handle(self):
        """The C handle; raises ClosedHandleError once closed."""
        if self.closed:
            raise ClosedHandleError(f"{type(self).__name__} is closed")
        return self._ptr

    def close(self) -> None:
        """Destroy the C object now. Safe to call more than once."""
        if self._finalizer is not None:
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
