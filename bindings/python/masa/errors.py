"""Exceptions raised by the masa binding.

Two families:

* :class:`MasaError` -- a libmasa function returned a status other than
  ``MASA_OK``.  ``.status`` is the numeric ``masa_status``, ``.status_name``
  its short description and ``.message`` the text of ``masa_last_error()``.
  Each status has its own subclass (which also derives from the closest
  built-in exception, e.g. :class:`BadShapeError` is a ``ValueError``).
* :class:`LibraryError` -- the shared library could not be found, loaded or
  is the wrong version (an ``OSError``).

Using an object after ``close()`` raises :class:`ClosedHandleError` (a
``ValueError``, like operations on a closed file).
"""

from __future__ import annotations


class MasaError(Exception):
    """A libmasa call failed. Carries the status and masa_last_error()."""

    status: int | None = None

    def __init__(self, status, message, function=None, status_name=None):
        self.status = status
        self.message = message
        self.function = function
        self.status_name = status_name
        text = message or status_name or "libmasa error"
        if status_name and message:
            text = f"{message} [{status_name}]"
        super().__init__(text)


class NullArgumentError(MasaError):
    status = 1


class InvalidArgumentError(MasaError, ValueError):
    status = 2


class BadShapeError(MasaError, ValueError):
    status = 3


class OutOfRangeError(MasaError, IndexError):
    status = 4


class BufferTooSmallError(MasaError, ValueError):
    status = 5


class SizeOverflowError(MasaError, OverflowError):
    status = 6


class OutOfMemoryError(MasaError, MemoryError):
    status = 7


class BadStructSizeError(MasaError):
    status = 8


class NotReadyError(MasaError, RuntimeError):
    status = 9


class ThreadError(MasaError, RuntimeError):
    status = 10


class InternalError(MasaError, RuntimeError):
    status = 11


class FileIOError(MasaError, OSError):
    """A file could not be opened, read or written (MASA_ERROR_IO)."""

    status = 12


class BadFormatError(MasaError, ValueError):
    """A file's contents are malformed (MASA_ERROR_BAD_FORMAT)."""

    status = 13


class NotFoundError(MasaError, KeyError):
    """No tensor or metadata entry of that name (MASA_ERROR_NOT_FOUND)."""

    status = 14

    def __str__(self):  # KeyError would quote the message
        return Exception.__str__(self)


_BY_STATUS = {
    cls.status: cls
    for cls in (
        NullArgumentError,
        InvalidArgumentError,
        BadShapeError,
        OutOfRangeError,
        BufferTooSmallError,
        SizeOverflowError,
        OutOfMemoryError,
        BadStructSizeError,
        NotReadyError,
        ThreadError,
        InternalError,
        FileIOError,
        BadFormatError,
        NotFoundError,
    )
}


def error_for_status(status, message, function=None, status_name=None):
    """The MasaError subclass instance for a masa_status value."""
    cls = _BY_STATUS.get(status, MasaError)
    return cls(status, message, function=function, status_name=status_name)


class ClosedHandleError(ValueError):
    """An object was used after close() (or after its context was closed)."""


class LibraryError(OSError):
    """libmasa could not be loaded or does not match this binding."""


class LibraryNotFoundError(LibraryError):
    """No libmasa shared library was found; the message lists every place
    that was searched."""

    def __init__(self, message, searched=()):
        super().__init__(message)
        self.searched = list(searched)


class LibraryVersionError(LibraryError):
    """The loaded libmasa has an incompatible version."""
