"""ctypes declarations of include/oscar.h and the loader of liboscar.so.

Search order for the shared object:
  1. the environment variable OSCAR_LIBRARY (a file, or a directory that
     holds liboscar.so);
  2. the copy bundled in the package, oscar/liboscar.so (an installed wheel:
     `pip install ./python` builds it);
  3. the repository's build directory, ../build/liboscar.so relative to the
     python/ folder that holds this package (the README's `make build`);
  4. ctypes.util.find_library("oscar") (the system's library path).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from . import errors

c_int = ctypes.c_int
c_int32 = ctypes.c_int32
c_int64 = ctypes.c_int64
c_double = ctypes.c_double
c_size_t = ctypes.c_size_t
c_void_p = ctypes.c_void_p
c_char_p = ctypes.c_char_p
c_float = ctypes.c_float
c_uint16 = ctypes.c_uint16
P = ctypes.POINTER

_LIBNAME = "liboscar.so"

# Enums (include/oscar.h).
METHOD_NONE, METHOD_KIVI, METHOD_QUAROT, METHOD_SCALE_ONLY, METHOD_OSCAR = range(5)
DTYPE_F32, DTYPE_F16, DTYPE_BF16 = range(3)
BACKEND_CPU, BACKEND_CUDA = range(2)


class Config(ctypes.Structure):
    # Every member is an int or an enum (an int on every ABI we target).
    _fields_ = [
        ("struct_size", c_size_t),
        ("method", c_int),
        ("bits", c_int),
        ("head_dim", c_int),
        ("num_kv_heads", c_int),
        ("num_q_heads", c_int),
        ("num_layers", c_int),
        ("k_group", c_int),
        ("v_group", c_int),
        ("residual", c_int),
        ("window_dtype", c_int),
        ("rotate_values", c_int),
        ("block_count", c_int),
        ("max_seqs", c_int),
        ("backend", c_int),
        ("device", c_int),
        ("num_threads", c_int),
        ("check_finite", c_int),
        ("rollback_tokens", c_int),
        ("caller_metadata", c_int),
        # format version 3 (docs/ACCURACY.md, "Past the paper"); 0 = as published
        ("sink_tokens", c_int),
        ("clip_search", c_int),
        # format version 4; 0 = as published
        ("key_norm_per_head", c_int),
        ("key_bits", c_int),
        ("value_bits", c_int),
    ]


class SeqInfo(ctypes.Structure):
    _fields_ = [
        ("tokens", c_int64),
        ("packed_tokens", c_int64),
        ("window_tokens", c_int32),
        ("blocks", c_int32),
    ]


class MemoryStats(ctypes.Structure):
    _fields_ = [
        ("block_bytes", c_int64),
        ("blocks_total", c_int64),
        ("blocks_free", c_int64),
        ("blocks_used", c_int64),
        ("pool_bytes", c_int64),
        ("window_bytes", c_int64),
        ("bytes_in_use", c_int64),
        ("seqs_live", c_int32),
        ("seqs_max", c_int32),
        ("packed_bytes_per_token", c_double),
        ("window_bytes_per_token", c_double),
        ("fp16_bytes_per_token", c_double),
    ]


class Batch(ctypes.Structure):
    """struct oscar_batch: the batch API's per-call description (pointers are
    backend memory: device pointers for CUDA, host pointers for CPU)."""
    _fields_ = [
        ("num_seqs", c_int32),
        ("tokens_per_seq", c_int32),
        ("max_seq_len", c_int32),
        ("block_table_stride", c_int32),
        ("seq_lens", c_void_p),
        ("window_slots", c_void_p),
        ("block_tables", c_void_p),
        ("key_head_sumsq", c_void_p),
        ("key_heads_total", c_int32),
    ]


class MemoryRequirements(ctypes.Structure):
    _fields_ = [
        ("pool_bytes", c_size_t),
        ("window_bytes", c_size_t),
        ("workspace_bytes", c_size_t),
        ("alignment", c_size_t),
    ]


class MemorySource(ctypes.Structure):
    _fields_ = [
        ("pool", c_void_p),
        ("windows", c_void_p),
        ("workspace", c_void_p),
        ("allocator", c_void_p),
    ]


# name: (restype, argtypes)
_PROTOTYPES = {
    "oscar_version": (c_char_p, []),
    "oscar_status_name": (c_char_p, [c_int]),
    "oscar_method_name": (c_char_p, [c_int]),
    "oscar_method_parse": (c_int, [c_char_p, P(c_int)]),
    "oscar_backend_available": (c_int, [c_int]),
    "oscar_config_default": (Config, []),
    "oscar_config_validate": (c_int, [P(Config), c_char_p, c_size_t]),
    "oscar_config_packed_bits": (c_int, [P(Config), P(c_double)]),
    "oscar_cache_create": (c_int, [P(Config), P(c_void_p), c_char_p, c_size_t]),
    "oscar_cache_destroy": (None, [c_void_p]),
    "oscar_cache_config": (c_int, [c_void_p, P(Config)]),
    "oscar_last_error": (c_char_p, [c_void_p]),
    "oscar_seq_add": (c_int, [c_void_p, P(c_int32)]),
    "oscar_seq_fork": (c_int, [c_void_p, c_int32, P(c_int32)]),
    "oscar_seq_free": (c_int, [c_void_p, c_int32]),
    "oscar_seq_truncate": (c_int, [c_void_p, c_int32, c_int64]),
    "oscar_poll": (c_int, [c_void_p]),
    "oscar_synchronize": (c_int, [c_void_p, c_void_p]),
    "oscar_seq_info_get": (c_int, [c_void_p, c_int32, c_int, P(SeqInfo)]),
    "oscar_seq_block_table": (c_int, [c_void_p, c_int32, c_void_p, c_int32, P(c_int32)]),
    "oscar_append": (c_int, [c_void_p, c_int, c_int, c_void_p, c_void_p,
                             c_void_p, c_void_p, c_int, c_void_p]),
    "oscar_attention": (c_int, [c_void_p, c_int, c_int, c_void_p, c_int, c_void_p,
                                c_int, c_void_p, c_int, c_float, c_void_p]),
    "oscar_seq_read": (c_int, [c_void_p, c_int32, c_int, c_int64, c_int64,
                               c_void_p, c_void_p]),
    "oscar_memory": (c_int, [c_void_p, P(MemoryStats)]),
    "oscar_seq_export": (c_int, [c_void_p, c_int32, c_void_p, c_size_t, P(c_size_t)]),
    "oscar_seq_import": (c_int, [c_void_p, c_void_p, c_size_t, P(c_int32)]),
    "oscar_memory_requirements_get": (c_int, [P(Config), P(MemoryRequirements), c_char_p, c_size_t]),
    "oscar_cache_create_with_memory": (c_int, [P(Config), P(MemorySource), P(c_void_p), c_char_p,
                                               c_size_t]),
    "oscar_append_with_key_sums": (c_int, [c_void_p, c_int, c_int, c_void_p, c_void_p, c_void_p,
                                           c_void_p, c_int, c_void_p, c_int, c_void_p]),
    "oscar_key_sumsq": (c_int, [c_void_p, c_int64, c_void_p, c_int, c_void_p, c_void_p]),
    "oscar_batch_append": (c_int, [c_void_p, c_int, P(Batch), c_void_p, c_void_p, c_int, c_void_p]),
    "oscar_batch_attention": (c_int, [c_void_p, c_int, P(Batch), c_void_p, c_int, c_void_p, c_int,
                                      c_float, c_void_p]),
    "oscar_slot_copy": (c_int, [c_void_p, c_int32, c_int32, c_int64, c_void_p]),
    "oscar_hadamard": (c_int, [c_void_p, c_int64, c_int]),
    "oscar_fold_hadamard_wv": (c_int, [c_void_p, c_int, c_int, c_int64]),
    "oscar_fold_hadamard_wo": (c_int, [c_void_p, c_int64, c_int, c_int]),
    "oscar_f32_to_f16": (c_uint16, [c_float]),
    "oscar_f16_to_f32": (c_float, [c_uint16]),
    "oscar_f32_to_bf16": (c_uint16, [c_float]),
    "oscar_bf16_to_f32": (c_float, [c_uint16]),
}


class _Missing:
    """Stands in for a symbol the loaded library lacks."""

    def __init__(self, name: str, path: str):
        self.name = name
        self.path = path

    def __call__(self, *args):
        raise errors.UnsupportedError(
            "%s is not exported by %s (library older than the binding?)" % (self.name, self.path))


class Lib:
    """The loaded library: one attribute per C function, plus `path`."""

    def __init__(self, cdll: ctypes.CDLL, path: str):
        self._cdll = cdll
        self.path = path
        self.missing = []
        for name, (restype, argtypes) in _PROTOTYPES.items():
            try:
                fn = getattr(cdll, name)
            except AttributeError:
                self.missing.append(name)
                setattr(self, name[len("oscar_"):], _Missing(name, path))
                continue
            fn.restype = restype
            fn.argtypes = argtypes
            setattr(self, name[len("oscar_"):], fn)


def _candidates() -> list:
    out = []
    env = os.environ.get("OSCAR_LIBRARY")
    if env:
        if os.path.isdir(env):
            out.append(("OSCAR_LIBRARY", os.path.join(env, _LIBNAME)))
        else:
            out.append(("OSCAR_LIBRARY", env))
        return out  # an explicit choice is never overridden silently
    here = os.path.dirname(os.path.abspath(__file__))
    out.append(("bundled", os.path.join(here, _LIBNAME)))
    python_dir = os.path.dirname(here)
    for build in (os.path.join(python_dir, "..", "build"), os.path.join(python_dir, "build")):
        out.append(("build directory", os.path.normpath(os.path.join(build, _LIBNAME))))
    found = ctypes.util.find_library("oscar")
    if found:
        out.append(("find_library", found))
    return out


def load() -> Lib:
    tried = []
    for how, path in _candidates():
        if how != "find_library" and not os.path.exists(path):
            tried.append("%s (%s: no such file)" % (path, how))
            continue
        try:
            cdll = ctypes.CDLL(path)
        except OSError as e:
            tried.append("%s (%s: %s)" % (path, how, e))
            continue
        return Lib(cdll, path)
    raise errors.LibraryNotFoundError(
        "cannot load liboscar.so. Build it with `make build` in the repository root "
        "(it lands in build/liboscar.so) or set OSCAR_LIBRARY to its path. Tried: "
        + "; ".join(tried) if tried else "cannot load liboscar.so: nothing to try; set OSCAR_LIBRARY")
