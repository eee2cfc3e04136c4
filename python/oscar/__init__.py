"""oscar: a 2-bit KV cache for LLM attention with the OScaR method.

Python binding of liboscar.so through ctypes (no compile step). See
python/README.md ("Use from Python").

    import oscar
    pool = oscar.OscarPool(head_dim=64, num_kv_heads=2, num_q_heads=4, num_layers=1)
    seq = pool.add_seq()
    pool.append(0, [seq], None, k, v)            # k, v: [tokens, Hkv, d]
    out = pool.attention(0, [seq], q)            # q: [1, 1, Hq, d]

Two classes, not to be confused:
- :class:`oscar.OscarPool`: the paged pool (the C library's oscar_cache).
- :class:`oscar.hf.OscarHFCache`: the transformers ``Cache`` built on it
  (imports torch and transformers; call ``oscar.hf.register()`` first).
torch custom ops for torch.compile and CUDA graphs: :mod:`oscar.ops`.
(``oscar.OscarCache`` is a deprecated alias of ``OscarPool``.)
"""

from __future__ import annotations

from . import _lib, errors
from ._version import __version__ as _package_version
from .errors import (BackendError, ContiguityError, DeviceError, DTypeError, FormatError,
                     InvalidArgumentError, LibraryNotFoundError, NonFiniteError, NotFoundError,
                     OscarError, OutOfMemoryError, PoolExhaustedError, ShapeError,
                     UnsupportedError, VersionMismatchError)

_L = _lib.load()

library_path = _L.path
"""Path of the loaded liboscar.so."""

_lib_version = _L.version()
_lib_version = _lib_version.decode() if _lib_version else ""
if _lib_version != _package_version:
    raise VersionMismatchError(
        "the oscar Python package is version %s but %s reports %r; rebuild the library "
        "(make build) or use the matching python/ folder" % (_package_version, _L.path, _lib_version))

__version__ = _lib_version

from . import cache as _cache_mod  # noqa: E402

_cache_mod._lib_handle = _L

from ._tensor import numpy_bf16, parse_dtype  # noqa: E402,F401
from .cache import MemoryStats, OscarConfig, OscarPool, SeqInfo  # noqa: E402

OSCAR_MAX_Q_LEN = 4096
"""Longest query piece of one attention call (include/oscar.h)."""


def version() -> str:
    """The C library's version string (oscar_version())."""
    return __version__


def status_name(status: int) -> str:
    """oscar_status_name(status)."""
    s = _L.status_name(int(status))
    return s.decode() if s else ""


def backend_available(backend="cpu") -> bool:
    """True if the backend ("cpu" or "cuda") is compiled in (and, for CUDA, a device exists)."""
    return bool(_L.backend_available(_cache_mod._parse_backend(backend)))


def _host_f32(x, name):
    from . import _tensor
    v = _tensor.view(x, name, dtypes=(_lib.DTYPE_F32,), writable=True)
    if v.device_type != "cpu":
        raise DeviceError("%s: this helper runs on the host; got a %s tensor" % (name, v.device_type))
    return v


def hadamard(x):
    """In place: x <- H_n x along the last axis (float32 host array/tensor, n a power of two).
    Returns x."""
    v = _host_f32(x, "x")
    if not v.shape:
        raise ShapeError("x: needs at least one dimension")
    n = v.shape[-1]
    rows = 1
    for s in v.shape[:-1]:
        rows *= s
    st = _L.hadamard(v.ptr, rows, n)
    if st != 0:
        raise errors.make_error(st, "n = %d must be a power of two in 1..65536" % n, "oscar_hadamard")
    return x


def fold_hadamard_wv(w_v, num_kv_heads: int, head_dim: int):
    """In place: per KV head, W_v_h <- H W_v_h. w_v: float32 [Hkv*d, in_features]. Returns w_v."""
    v = _host_f32(w_v, "w_v")
    if len(v.shape) != 2 or v.shape[0] != num_kv_heads * head_dim:
        raise ShapeError("w_v: expected [%d, in_features], got %s" % (num_kv_heads * head_dim, list(v.shape)))
    st = _L.fold_hadamard_wv(v.ptr, int(num_kv_heads), int(head_dim), v.shape[1])
    if st != 0:
        raise errors.make_error(st, "", "oscar_fold_hadamard_wv")
    return w_v


def fold_hadamard_wo(w_o, num_q_heads: int, head_dim: int):
    """In place: W_o <- W_o blockdiag(H). w_o: float32 [out_features, Hq*d]. Returns w_o."""
    v = _host_f32(w_o, "w_o")
    if len(v.shape) != 2 or v.shape[1] != num_q_heads * head_dim:
        raise ShapeError("w_o: expected [out_features, %d], got %s" % (num_q_heads * head_dim, list(v.shape)))
    st = _L.fold_hadamard_wo(v.ptr, v.shape[0], int(num_q_heads), int(head_dim))
    if st != 0:
        raise errors.make_error(st, "", "oscar_fold_hadamard_wo")
    return w_o


def __getattr__(name):
    if name == "OscarCache":
        import warnings
        warnings.warn("oscar.OscarCache is deprecated: the paged pool is oscar.OscarPool "
                      "(the transformers Cache is oscar.hf.OscarHFCache)", DeprecationWarning,
                      stacklevel=2)
        return OscarPool
    # Lazy: the Hugging Face cache needs torch + transformers.
    if name in ("OscarHFCache", "register"):
        from . import hf
        return getattr(hf, name)
    raise AttributeError("module 'oscar' has no attribute %r" % name)


__all__ = [
    "__version__", "version", "library_path", "status_name", "backend_available",
    "OscarPool", "OscarConfig", "OSCAR_MAX_Q_LEN", "SeqInfo", "MemoryStats", "hadamard",
    "fold_hadamard_wv", "fold_hadamard_wo", "numpy_bf16", "parse_dtype",
    "OscarError", "InvalidArgumentError", "OutOfMemoryError", "PoolExhaustedError",
    "NonFiniteError", "UnsupportedError", "NotFoundError", "BackendError", "FormatError",
    "DTypeError", "ShapeError", "ContiguityError", "DeviceError", "LibraryNotFoundError",
    "VersionMismatchError", "errors",
]
