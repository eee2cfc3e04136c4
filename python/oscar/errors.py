"""Exceptions raised by the oscar binding.

Every ``oscar_status`` the C library returns becomes one subclass of
:class:`OscarError` carrying the library's message (``oscar_last_error`` for a
cache handle, the error buffer for creation and validation).  Checks done in
Python before calling the library (dtype, shape, contiguity, device) raise
subclasses of :class:`InvalidArgumentError`, the same exception the library
itself would raise for a bad argument.
"""

from __future__ import annotations

# Numeric values of enum oscar_status (include/oscar.h).
OK = 0
E_INVALID_ARGUMENT = 1
E_OUT_OF_MEMORY = 2
E_POOL_EXHAUSTED = 3
E_NONFINITE = 4
E_UNSUPPORTED = 5
E_NOT_FOUND = 6
E_BACKEND = 7
E_FORMAT = 8

_STATUS_NAMES = {
    OK: "OSCAR_OK",
    E_INVALID_ARGUMENT: "OSCAR_E_INVALID_ARGUMENT",
    E_OUT_OF_MEMORY: "OSCAR_E_OUT_OF_MEMORY",
    E_POOL_EXHAUSTED: "OSCAR_E_POOL_EXHAUSTED",
    E_NONFINITE: "OSCAR_E_NONFINITE",
    E_UNSUPPORTED: "OSCAR_E_UNSUPPORTED",
    E_NOT_FOUND: "OSCAR_E_NOT_FOUND",
    E_BACKEND: "OSCAR_E_BACKEND",
    E_FORMAT: "OSCAR_E_FORMAT",
}


class OscarError(Exception):
    """Base class of every error raised by the oscar package.

    Attributes: ``status`` (the ``oscar_status`` value), ``status_name``
    (e.g. ``"OSCAR_E_POOL_EXHAUSTED"``) and ``message`` (the library's text).
    """

    status = -1

    def __init__(self, message: str = "", status: int | None = None):
        if status is not None:
            self.status = status
        self.message = message
        super().__init__(message)

    @property
    def status_name(self) -> str:
        return _STATUS_NAMES.get(self.status, "OSCAR_E_UNKNOWN(%d)" % self.status)

    def __str__(self) -> str:
        msg = self.message or "(no message)"
        return "%s: %s" % (self.status_name, msg)


class InvalidArgumentError(OscarError, ValueError):
    """OSCAR_E_INVALID_ARGUMENT: null pointer, bad size, bad enum, bad tensor."""

    status = E_INVALID_ARGUMENT


class OutOfMemoryError(OscarError, MemoryError):
    """OSCAR_E_OUT_OF_MEMORY: a host or device allocation failed."""

    status = E_OUT_OF_MEMORY


class PoolExhaustedError(OscarError):
    """OSCAR_E_POOL_EXHAUSTED: no free block or sequence slot in the pool."""

    status = E_POOL_EXHAUSTED


class NonFiniteError(OscarError, ValueError):
    """OSCAR_E_NONFINITE: NaN or Inf in K or V (with config.check_finite)."""

    status = E_NONFINITE


class UnsupportedError(OscarError):
    """OSCAR_E_UNSUPPORTED: backend not built, no device, or missing symbol."""

    status = E_UNSUPPORTED


class NotFoundError(OscarError, LookupError):
    """OSCAR_E_NOT_FOUND: unknown sequence id."""

    status = E_NOT_FOUND


class BackendError(OscarError, RuntimeError):
    """OSCAR_E_BACKEND: a CUDA call failed."""

    status = E_BACKEND


class FormatError(OscarError, ValueError):
    """OSCAR_E_FORMAT: an export stream is malformed or does not match."""

    status = E_FORMAT


# ---- argument checks done in Python (all are InvalidArgumentError) --------

class DTypeError(InvalidArgumentError, TypeError):
    """A tensor has a dtype the call does not accept."""


class ShapeError(InvalidArgumentError):
    """A tensor has the wrong shape."""


class ContiguityError(InvalidArgumentError):
    """A tensor is not C-contiguous (the binding never copies silently)."""


class DeviceError(InvalidArgumentError):
    """A tensor lives on the wrong device for the cache's backend."""


# ---- loading --------------------------------------------------------------

class LibraryNotFoundError(OscarError, ImportError):
    """liboscar.so could not be found or loaded."""

    status = E_UNSUPPORTED

    def __str__(self) -> str:
        return self.message


class VersionMismatchError(OscarError, ImportError):
    """The Python package and the C library have different versions."""

    status = E_UNSUPPORTED

    def __str__(self) -> str:
        return self.message


_BY_STATUS = {
    E_INVALID_ARGUMENT: InvalidArgumentError,
    E_OUT_OF_MEMORY: OutOfMemoryError,
    E_POOL_EXHAUSTED: PoolExhaustedError,
    E_NONFINITE: NonFiniteError,
    E_UNSUPPORTED: UnsupportedError,
    E_NOT_FOUND: NotFoundError,
    E_BACKEND: BackendError,
    E_FORMAT: FormatError,
}


def error_class(status: int) -> type:
    """The exception class for an oscar_status value."""
    return _BY_STATUS.get(status, OscarError)


def make_error(status: int, message: str, context: str = "") -> OscarError:
    cls = error_class(status)
    if context:
        message = "%s: %s" % (context, message) if message else context
    return cls(message, status=status)
