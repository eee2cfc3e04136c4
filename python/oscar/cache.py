"""The paged KV-cache API: a block pool, sequences, append and attention.

The shape follows what vLLM-style engines use: one :class:`OscarPool` is the
block pool of every layer; sequences are added, forked (prefix sharing: the
packed blocks are shared, reference-counted) and freed; each sequence has a
block table of int32 physical block ids; K/V of a batch of sequences are
appended per layer; decode attention runs for a batch of queries.

With ``caller_metadata=1`` the pool is driven by the batch API instead
(:meth:`OscarPool.batch_append`, :meth:`OscarPool.batch_attention`,
:meth:`OscarPool.slot_copy`): the caller owns block tables, lengths and window
slots (docs/ENGINES.md). The Hugging Face ``Cache`` built on it is
:class:`oscar.hf.OscarHFCache`.
"""

from __future__ import annotations

import ctypes
import dataclasses
from dataclasses import dataclass
from typing import Optional

from . import _lib, _tensor
from .errors import (InvalidArgumentError, OscarError, ShapeError, DTypeError, DeviceError,
                     ContiguityError, make_error)

try:
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

_lib_handle = None  # set by oscar/__init__.py


def lib():
    if _lib_handle is None:  # pragma: no cover - __init__ always sets it
        raise OscarError("oscar library not loaded")
    return _lib_handle


def _s(b) -> str:
    if b is None:
        return ""
    return b.decode("utf-8", "replace")


METHODS = {"none": _lib.METHOD_NONE, "kivi": _lib.METHOD_KIVI, "quarot": _lib.METHOD_QUAROT,
           "scale-only": _lib.METHOD_SCALE_ONLY, "oscar": _lib.METHOD_OSCAR}
_METHOD_NAMES = {v: k for k, v in METHODS.items()}
BACKENDS = {"cpu": _lib.BACKEND_CPU, "cuda": _lib.BACKEND_CUDA}
_BACKEND_NAMES = {v: k for k, v in BACKENDS.items()}
_DTYPE_SHORT = {_lib.DTYPE_F32: "f32", _lib.DTYPE_F16: "f16", _lib.DTYPE_BF16: "bf16"}


def _parse_method(m) -> int:
    if isinstance(m, int) and not isinstance(m, bool):
        return m  # the library validates the range
    if isinstance(m, str):
        key = m.lower().replace("_", "-")
        if key in METHODS:
            return METHODS[key]
        out = ctypes.c_int()
        st = lib().method_parse(m.encode(), ctypes.byref(out))
        if st == 0:
            return out.value
        raise InvalidArgumentError("unknown method %r (one of: %s)" % (m, ", ".join(METHODS)))
    raise InvalidArgumentError("method must be a name or an int, got %r" % (m,))


def _parse_backend(b) -> int:
    if isinstance(b, int) and not isinstance(b, bool):
        return b
    if isinstance(b, str) and b.lower() in BACKENDS:
        return BACKENDS[b.lower()]
    raise InvalidArgumentError("unknown backend %r (cpu or cuda)" % (b,))


@dataclass
class OscarConfig:
    """Mirror of ``struct oscar_config``. ``None`` fields take the library's
    defaults (oscar_config_default()). Names are accepted for the enums:
    method ("none", "kivi", "quarot", "scale-only", "oscar"), window_dtype
    ("f32", "f16", "bf16", or a numpy/torch dtype), backend ("cpu", "cuda")."""

    method: object = None
    bits: Optional[int] = None
    head_dim: Optional[int] = None
    num_kv_heads: Optional[int] = None
    num_q_heads: Optional[int] = None
    num_layers: Optional[int] = None
    k_group: Optional[int] = None
    v_group: Optional[int] = None
    residual: Optional[int] = None
    window_dtype: object = None
    rotate_values: Optional[int] = None
    block_count: Optional[int] = None
    max_seqs: Optional[int] = None
    backend: object = None
    device: Optional[int] = None
    num_threads: Optional[int] = None
    check_finite: Optional[int] = None
    rollback_tokens: Optional[int] = None
    caller_metadata: Optional[int] = None
    sink_tokens: Optional[int] = None   # docs/ACCURACY.md "Past the paper"; both APIs
    clip_search: Optional[int] = None   # 0 or 1
    key_norm_per_head: Optional[int] = None  # 0 or 1 (format version 4)
    key_bits: Optional[int] = None      # 0 (= bits), 2, 3 or 4 (3: format version 5)
    value_bits: Optional[int] = None    # 0 (= bits), 2, 3 or 4

    def __post_init__(self):
        d = lib().config_default()
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None:
                setattr(self, f.name, getattr(d, f.name))
        # normalise enums to names
        self.method = _METHOD_NAMES.get(_parse_method(self.method), self.method)
        self.window_dtype = _DTYPE_SHORT.get(_tensor.parse_dtype(self.window_dtype), self.window_dtype)
        self.backend = _BACKEND_NAMES.get(_parse_backend(self.backend), self.backend)
        for name in ("rotate_values", "check_finite", "caller_metadata"):
            setattr(self, name, int(bool(getattr(self, name))))

    def to_c(self) -> _lib.Config:
        c = _lib.Config()
        for f in dataclasses.fields(self):
            setattr(c, f.name, 0)
        c.struct_size = ctypes.sizeof(_lib.Config)
        c.method = _parse_method(self.method)
        c.window_dtype = _tensor.parse_dtype(self.window_dtype)
        c.backend = _parse_backend(self.backend)
        for name in ("bits", "head_dim", "num_kv_heads", "num_q_heads", "num_layers", "k_group",
                     "v_group", "residual", "rotate_values", "block_count", "max_seqs", "device",
                     "num_threads", "check_finite", "rollback_tokens", "caller_metadata", "sink_tokens",
                     "clip_search", "key_norm_per_head", "key_bits", "value_bits"):
            val = getattr(self, name)
            try:
                setattr(c, name, int(val))
            except (TypeError, ValueError):
                raise InvalidArgumentError("config.%s must be an int, got %r" % (name, val))
        return c

    @classmethod
    def from_c(cls, c: _lib.Config) -> "OscarConfig":
        kw = {f.name: getattr(c, f.name) for f in dataclasses.fields(cls)}
        return cls(**kw)

    def validate(self) -> None:
        """Raises InvalidArgumentError with the library's message if invalid."""
        c = self.to_c()
        buf = ctypes.create_string_buffer(512)
        st = lib().config_validate(ctypes.byref(c), buf, len(buf))
        if st != 0:
            raise make_error(st, _s(buf.value), "invalid oscar config")

    def memory_requirements(self) -> dict:
        """Bytes of backend memory the configuration needs, per region
        (oscar_memory_requirements_get): ``{"pool", "windows", "workspace",
        "alignment"}``."""
        c = self.to_c()
        out = _lib.MemoryRequirements()
        buf = ctypes.create_string_buffer(512)
        st = lib().memory_requirements_get(ctypes.byref(c), ctypes.byref(out), buf, len(buf))
        if st != 0:
            raise make_error(st, _s(buf.value), "oscar_memory_requirements_get")
        return {"pool": out.pool_bytes, "windows": out.window_bytes,
                "workspace": out.workspace_bytes, "alignment": out.alignment}

    def packed_bits(self) -> float:
        """Bits per K/V element of a full quantised block (codes + params + norms)."""
        c = self.to_c()
        out = ctypes.c_double()
        st = lib().config_packed_bits(ctypes.byref(c), ctypes.byref(out))
        if st != 0:
            raise make_error(st, "", "oscar_config_packed_bits")
        return out.value

    def replace(self, **kw) -> "OscarConfig":
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class SeqInfo:
    """Mirror of ``struct oscar_seq_info`` for one (sequence, layer)."""
    tokens: int
    packed_tokens: int
    window_tokens: int
    blocks: int


@dataclass(frozen=True)
class MemoryStats:
    """Mirror of ``struct oscar_memory_stats`` (bytes unless noted)."""
    block_bytes: int
    blocks_total: int
    blocks_free: int
    blocks_used: int
    pool_bytes: int
    window_bytes: int
    bytes_in_use: int
    seqs_live: int
    seqs_max: int
    packed_bytes_per_token: float
    window_bytes_per_token: float
    fp16_bytes_per_token: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def compression_vs_fp16(self) -> float:
        """fp16 bytes per token divided by packed bytes per token."""
        if self.packed_bytes_per_token <= 0:
            return float("nan")
        return self.fp16_bytes_per_token / self.packed_bytes_per_token


def _int32_view(x, name: str, ndim: int):
    """Pointer of a writable host int32 array/tensor (numpy or torch CPU)."""
    if _tensor.is_torch(x):
        t = _tensor._torch()
        if x.dtype != t.int32:
            raise DTypeError("%s: block tables are int32, got %s" % (name, x.dtype))
        if x.device.type != "cpu":
            raise DeviceError("%s: this call fills a host tensor; got %s" % (name, x.device))
        if not x.is_contiguous():
            raise ContiguityError("%s: tensor is not contiguous" % name)
        ptr, shape = x.data_ptr(), tuple(x.shape)
    elif _tensor.is_numpy(x):
        if x.dtype != np.int32:
            raise DTypeError("%s: block tables are int32, got %s" % (name, x.dtype))
        if not x.flags.c_contiguous:
            raise ContiguityError("%s: array is not C-contiguous" % name)
        if not x.flags.writeable:
            raise InvalidArgumentError("%s: array is read-only" % name)
        ptr, shape = x.ctypes.data, x.shape
    else:
        raise DTypeError("%s: expected a numpy array or a torch tensor, got %s"
                         % (name, type(x).__name__))
    if len(shape) != ndim:
        raise ShapeError("%s: expected %d dimensions, got shape %s" % (name, ndim, list(shape)))
    return ptr, shape


class OscarPool:
    """The paged 2-bit OScaR KV pool: the block pool of every layer, and its sequences.

    ``OscarPool(config=None, memory=None, **fields)``: ``fields`` override the
    config's (see :class:`OscarConfig`), e.g. ``OscarPool(head_dim=64,
    num_kv_heads=2, num_q_heads=4, num_layers=2, residual=32)``.

    ``memory``: caller-owned backend memory (oscar_cache_create_with_memory),
    a dict with any of ``"pool"``, ``"windows"``, ``"workspace"``: contiguous
    torch uint8 tensors on the pool's device (CPU tensors for the CPU
    backend), each at least :meth:`OscarConfig.memory_requirements` bytes and
    aligned to its ``alignment``. The pool keeps references to them until
    :meth:`close`. Missing regions are allocated by the library.

    Not to be confused with :class:`oscar.hf.OscarHFCache`, the transformers
    ``Cache`` built on this pool. (``oscar.OscarCache`` is a deprecated alias
    of this class.)
    """

    def __init__(self, config: Optional[OscarConfig] = None, memory: Optional[dict] = None,
                 **overrides):
        if config is None:
            config = OscarConfig(**overrides)
        elif overrides:
            config = config.replace(**overrides)
        c = config.to_c()
        handle = ctypes.c_void_p()
        buf = ctypes.create_string_buffer(512)
        self._h = None
        self._lib = lib()
        self._memory = None
        if memory is not None:
            src = self._memory_source(config, memory)
            st = self._lib.cache_create_with_memory(ctypes.byref(c), ctypes.byref(src),
                                                    ctypes.byref(handle), buf, len(buf))
            self._memory = dict(memory)
        else:
            st = self._lib.cache_create(ctypes.byref(c), ctypes.byref(handle), buf, len(buf))
        if st != 0:
            raise make_error(st, _s(buf.value), "cannot create oscar cache")
        self._h = handle
        cc = _lib.Config()
        self._check(self._lib.cache_config(self._h, ctypes.byref(cc)), "oscar_cache_config")
        self._cc = cc
        self._config = OscarConfig.from_c(cc)
        self._seqs = []

    @staticmethod
    def _memory_source(config: OscarConfig, memory: dict) -> _lib.MemorySource:
        unknown = set(memory) - {"pool", "windows", "workspace"}
        if unknown:
            raise InvalidArgumentError("memory: unknown regions %s (pool, windows, workspace)"
                                       % sorted(unknown))
        need = config.memory_requirements()
        want_cuda = _parse_backend(config.backend) == _lib.BACKEND_CUDA
        src = _lib.MemorySource()
        for name in ("pool", "windows", "workspace"):
            t = memory.get(name)
            if t is None:
                continue
            if not _tensor.is_torch(t):
                raise DTypeError("memory[%r]: expected a torch tensor, got %s" % (name, type(t).__name__))
            if not t.is_contiguous():
                raise ContiguityError("memory[%r]: tensor is not contiguous" % name)
            nbytes = t.numel() * t.element_size()
            if nbytes < need[name]:
                raise ShapeError("memory[%r]: %d bytes, the configuration needs %d"
                                 % (name, nbytes, need[name]))
            if t.data_ptr() % need["alignment"]:
                raise InvalidArgumentError("memory[%r]: address not aligned to %d bytes"
                                           % (name, need["alignment"]))
            if (t.device.type == "cuda") != want_cuda or (
                    want_cuda and (t.device.index or 0) != int(config.device)):
                raise DeviceError("memory[%r] is on %s but the pool uses %s" % (
                    name, t.device, "cuda:%d" % int(config.device) if want_cuda else "the CPU"))
            setattr(src, name, t.data_ptr())
        return src

    # ---- lifetime ---------------------------------------------------------
    def close(self) -> None:
        """Frees the pool and every sequence. Idempotent."""
        h, self._h = getattr(self, "_h", None), None
        if h is not None:
            self._lib.cache_destroy(h)
        self._seqs = []
        self._memory = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def closed(self) -> bool:
        return self._h is None

    def _handle(self):
        if self._h is None:
            raise InvalidArgumentError("the cache is closed")
        return self._h

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            msg = _s(self._lib.last_error(self._h)) if self._h is not None else ""
            raise make_error(status, msg, what)

    # ---- properties -----------------------------------------------------------
    @property
    def config(self) -> OscarConfig:
        """The configuration the cache was created with (a copy)."""
        return dataclasses.replace(self._config)

    @property
    def handle(self) -> int:
        """The oscar_cache* as an int (what the torch custom ops in oscar.ops take)."""
        return int(self._handle().value)

    @property
    def backend(self) -> str:
        return self._config.backend

    @property
    def device(self) -> str:
        """"cpu" or "cuda:N": where K/V/Q/out tensors must live."""
        return "cpu" if self._cc.backend == _lib.BACKEND_CPU else "cuda:%d" % self._cc.device

    @property
    def num_layers(self) -> int:
        return self._cc.num_layers

    @property
    def seqs(self) -> list:
        """Ids of the live sequences created through this object."""
        return list(self._seqs)

    def __repr__(self) -> str:
        c = self._config
        return ("OscarPool(method=%s, bits=%d, layers=%d, Hq=%d, Hkv=%d, d=%d, R=%d, "
                "blocks=%d, backend=%s%s)" % (c.method, c.bits, c.num_layers, c.num_q_heads,
                                             c.num_kv_heads, c.head_dim, c.residual,
                                             c.block_count, self.device,
                                             ", closed" if self.closed else ""))

    # ---- sequences ----------------------------------------------------------
    def add_seq(self) -> int:
        """A new empty sequence; returns its id."""
        sid = ctypes.c_int32()
        self._check(self._lib.seq_add(self._handle(), ctypes.byref(sid)), "oscar_seq_add")
        self._seqs.append(sid.value)
        return sid.value

    def add_seqs(self, n: int) -> list:
        """n new sequences (all or none)."""
        out = []
        try:
            for _ in range(n):
                out.append(self.add_seq())
        except OscarError:
            for s in out:
                self.free(s)
            raise
        return out

    def fork(self, src_seq: int) -> int:
        """A new sequence sharing src's history (packed blocks shared, window copied)."""
        sid = ctypes.c_int32()
        self._check(self._lib.seq_fork(self._handle(), int(src_seq), ctypes.byref(sid)),
                    "oscar_seq_fork(%d)" % src_seq)
        self._seqs.append(sid.value)
        return sid.value

    def truncate(self, seq_id: int, new_length: int) -> None:
        """Exact rollback: every layer keeps min(its tokens, new_length) tokens.

        The removed tokens must still be in the window (see the config's
        rollback_tokens); otherwise InvalidArgumentError and nothing changes."""
        self._check(self._lib.seq_truncate(self._handle(), int(seq_id), int(new_length)),
                    "oscar_seq_truncate(%d, %d)" % (seq_id, new_length))

    def poll(self) -> None:
        """Raises what the device reported since the last poll, without a sync.

        On the CUDA backend NaN/Inf input (check_finite) is found on the device:
        the append returns, the sequence is marked failed (its attention rows
        are NaN), and the next poll, synchronize, append or attention raises
        NonFiniteError naming it. Free the failed sequence."""
        self._check(self._lib.poll(self._handle()), "oscar_poll")

    def synchronize(self) -> None:
        """Waits for the current CUDA stream of the cache's device, then polls."""
        stream = None
        if self._cc.backend == _lib.BACKEND_CUDA:
            stream = _tensor._torch().cuda.current_stream(self._cc.device).cuda_stream or None
        self._check(self._lib.synchronize(self._handle(), stream), "oscar_synchronize")

    def free(self, seq_id: int) -> None:
        """Releases a sequence; its blocks return to the pool when no fork uses them."""
        self._check(self._lib.seq_free(self._handle(), int(seq_id)), "oscar_seq_free(%d)" % seq_id)
        if seq_id in self._seqs:
            self._seqs.remove(seq_id)

    def info(self, seq_id: int, layer: int = 0) -> SeqInfo:
        out = _lib.SeqInfo()
        self._check(self._lib.seq_info_get(self._handle(), int(seq_id), int(layer), ctypes.byref(out)),
                    "oscar_seq_info_get(seq %d, layer %d)" % (seq_id, layer))
        return SeqInfo(out.tokens, out.packed_tokens, out.window_tokens, out.blocks)

    def num_tokens(self, seq_id: int, layer: int = 0) -> int:
        return self.info(seq_id, layer).tokens

    def block_table(self, seq_id: int, out=None):
        """The sequence's block table (physical block ids, shared by all layers).

        Without ``out`` returns a new numpy int32 array. With ``out`` (a host
        int32 numpy array or torch tensor, 1-D) fills its first entries in
        place and returns the number of blocks; raises ShapeError if ``out``
        is too short (never truncates silently)."""
        h = self._handle()
        count = ctypes.c_int32()
        if out is None:
            self._check(self._lib.seq_block_table(h, int(seq_id), None, 0, ctypes.byref(count)),
                        "oscar_seq_block_table(%d)" % seq_id)
            arr = np.empty(count.value, dtype=np.int32)
            if count.value:
                got = ctypes.c_int32()
                self._check(self._lib.seq_block_table(h, int(seq_id), arr.ctypes.data, count.value,
                                                      ctypes.byref(got)),
                            "oscar_seq_block_table(%d)" % seq_id)
                arr = arr[: got.value]
            return arr
        ptr, shape = _int32_view(out, "out", 1)
        self._check(self._lib.seq_block_table(h, int(seq_id), ptr, shape[0], ctypes.byref(count)),
                    "oscar_seq_block_table(%d)" % seq_id)
        if count.value > shape[0]:
            raise ShapeError("out: sequence %d has %d blocks but out holds only %d"
                             % (seq_id, count.value, shape[0]))
        return count.value

    def block_tables(self, seq_ids, pad: int = -1, out=None):
        """A padded [len(seq_ids), max_blocks] int32 block-table matrix (vLLM's
        ``block_tables``). Returns numpy unless ``out`` is given: a 2-D int32
        numpy array or torch tensor (CPU or CUDA), filled in place (rows past
        a sequence's length get ``pad``) and returned."""
        ids = [int(s) for s in (seq_ids.tolist() if hasattr(seq_ids, "tolist") else seq_ids)]
        tables = [self.block_table(s) for s in ids]
        width = max([len(t) for t in tables] + [0])
        if out is not None and hasattr(out, "shape"):
            width = max(width, int(out.shape[1]) if len(out.shape) == 2 else width)
        host = np.full((len(ids), width), pad, dtype=np.int32)
        for i, t in enumerate(tables):
            host[i, : len(t)] = t
        if out is None:
            return host
        if _tensor.is_torch(out):
            t = _tensor._torch()
            if out.dtype != t.int32:
                raise DTypeError("out: block tables are int32, got %s" % out.dtype)
            if tuple(out.shape) != host.shape:
                raise ShapeError("out: shape %s, need %s" % (list(out.shape), list(host.shape)))
            out.copy_(t.from_numpy(host))
            return out
        _, shape = _int32_view(out, "out", 2)
        if tuple(shape) != host.shape:
            raise ShapeError("out: shape %s, need %s" % (list(shape), list(host.shape)))
        out[...] = host
        return out

    # ---- append / attention -------------------------------------------------------
    def append(self, layer: int, seq_ids, n_tokens, k, v) -> None:
        """Appends new K/V tokens of a batch of sequences to one layer.

        ``k``, ``v``: [sum(n_tokens), num_kv_heads, head_dim], float32/float16/
        bfloat16, C-contiguous, on the cache's device (numpy: CPU only); the
        tokens of seq_ids[0] first. ``n_tokens``: tokens per sequence (may be
        None for a single sequence). Not copied: the library reads the memory
        directly (on CUDA, on torch's current stream)."""
        h = self._handle()
        ids, idl = _tensor.int32_host(seq_ids, "seq_ids")
        cfg = self._cc
        shape = (None, cfg.num_kv_heads, cfg.head_dim)
        kv = _tensor.view(k, "k", shape=shape)
        vv = _tensor.view(v, "v", shape=shape)
        if n_tokens is None:
            if len(idl) != 1:
                raise InvalidArgumentError("n_tokens is required for more than one sequence")
            n_tokens = [kv.shape[0]]
        nt, ntl = _tensor.int32_host(n_tokens, "n_tokens")
        if len(ntl) != len(idl):
            raise ShapeError("n_tokens has %d entries for %d sequences" % (len(ntl), len(idl)))
        if any(n < 0 for n in ntl):
            raise InvalidArgumentError("n_tokens must be >= 0, got %s" % ntl)
        total = sum(ntl)
        if kv.shape[0] != total or vv.shape[0] != total:
            raise ShapeError("k and v must hold sum(n_tokens) = %d tokens; got k %s, v %s"
                             % (total, list(kv.shape), list(vv.shape)))
        if kv.dtype != vv.dtype:
            raise DTypeError("k and v must have the same dtype (k %s, v %s)"
                             % (_tensor.DTYPE_NAMES[kv.dtype], _tensor.DTYPE_NAMES[vv.dtype]))
        _tensor.check_device(kv, cfg.backend, cfg.device, "k")
        _tensor.check_device(vv, cfg.backend, cfg.device, "v")
        stream = _tensor.current_stream(kv)
        st = self._lib.append(h, int(layer), len(idl), ids, nt, kv.ptr, vv.ptr, kv.dtype, stream)
        self._check(st, "oscar_append(layer %d)" % layer)

    def attention(self, layer: int, seq_ids, q, out=None, q_len: Optional[int] = None,
                  softmax_scale: Optional[float] = None, out_dtype=None):
        """Decode attention of a batch of sequences over everything appended to ``layer``.

        ``q``: [n_seqs, q_len, num_q_heads, head_dim] (or [n_seqs, num_q_heads,
        head_dim] when q_len is 1), post-RoPE, on the cache's device. The
        q_len queries of a sequence are its last q_len appended tokens (causal
        among them). ``out``: same shape as q, any supported dtype, written in
        place; if None one is allocated (dtype ``out_dtype`` or q's) of the same
        kind (numpy/torch) and device as q. Returns ``out``."""
        h = self._handle()
        ids, idl = _tensor.int32_host(seq_ids, "seq_ids")
        n = len(idl)
        cfg = self._cc
        qv = _tensor.view(q, "q")
        if len(qv.shape) == 4:
            if q_len is None:
                q_len = qv.shape[1]
            expect = (n, q_len, cfg.num_q_heads, cfg.head_dim)
        elif len(qv.shape) == 3:
            if q_len is None:
                q_len = 1
            if q_len != 1:
                raise ShapeError("q: a 3-D q [n_seqs, num_q_heads, head_dim] means q_len = 1; "
                                 "use [n_seqs, q_len, num_q_heads, head_dim] for q_len = %d" % q_len)
            expect = (n, cfg.num_q_heads, cfg.head_dim)
        else:
            raise ShapeError("q: expected [n_seqs, q_len, num_q_heads, head_dim], got shape %s"
                             % list(qv.shape))
        if tuple(qv.shape) != expect:
            raise ShapeError("q: shape %s does not match the expected %s (n_seqs=%d, q_len=%d, "
                             "num_q_heads=%d, head_dim=%d)" % (list(qv.shape), list(expect), n,
                                                               q_len, cfg.num_q_heads, cfg.head_dim))
        if q_len < 1:
            raise InvalidArgumentError("q_len must be >= 1")
        _tensor.check_device(qv, cfg.backend, cfg.device, "q")
        if out is None:
            odt = qv.dtype if out_dtype is None else _tensor.parse_dtype(out_dtype)
            out = _tensor.empty_like_output(qv, expect, odt)
        ov = _tensor.view(out, "out", shape=expect, writable=True)
        if out_dtype is not None and ov.dtype != _tensor.parse_dtype(out_dtype):
            raise DTypeError("out: dtype %s differs from out_dtype %s"
                             % (_tensor.DTYPE_NAMES[ov.dtype], out_dtype))
        _tensor.check_device(ov, cfg.backend, cfg.device, "out")
        scale = 0.0 if softmax_scale is None else float(softmax_scale)
        stream = _tensor.current_stream(qv)
        st = self._lib.attention(h, int(layer), n, ids, int(q_len), qv.ptr, qv.dtype, ov.ptr,
                                 ov.dtype, scale, stream)
        self._check(st, "oscar_attention(layer %d)" % layer)
        return out

    def read(self, seq_id: int, layer: int, start: int = 0, count: Optional[int] = None, *,
             k_out=None, v_out=None, k: bool = True, v: bool = True):
        """Tokens [start, start+count) of a sequence's layer, dequantised, in the
        original space, as float32 host arrays [count, num_kv_heads, head_dim].
        Returns (k, v); an entry is None when ``k=False`` / ``v=False``.
        ``k_out``/``v_out``: host float32 numpy arrays or CPU torch tensors to
        fill in place."""
        h = self._handle()
        if count is None:
            count = self.info(seq_id, layer).tokens - start
        cfg = self._cc
        shape = (int(count), cfg.num_kv_heads, cfg.head_dim)
        ptrs = []
        res = []
        for want, o, name in ((k, k_out, "k_out"), (v, v_out, "v_out")):
            if not want and o is None:
                ptrs.append(None)
                res.append(None)
                continue
            if o is None:
                o = np.empty(shape, dtype=np.float32)
            ov = _tensor.view(o, name, shape=shape, dtypes=(_lib.DTYPE_F32,), writable=True)
            if ov.device_type != "cpu":
                raise DeviceError("%s: oscar_seq_read writes host memory; pass a CPU tensor "
                                  "or numpy array (got %s)" % (name, ov.device_type))
            ptrs.append(ov.ptr)
            res.append(o)
        st = self._lib.seq_read(h, int(seq_id), int(layer), int(start), int(count), ptrs[0], ptrs[1])
        self._check(st, "oscar_seq_read(seq %d, layer %d, [%d, %d))"
                    % (seq_id, layer, start, start + count))
        return res[0], res[1]

    # ---- memory -----------------------------------------------------------------
    def memory(self) -> MemoryStats:
        out = _lib.MemoryStats()
        self._check(self._lib.memory(self._handle(), ctypes.byref(out)), "oscar_memory")
        return MemoryStats(*(getattr(out, f[0]) for f in _lib.MemoryStats._fields_))

    # ---- export / import ------------------------------------------------------------
    def export_seq(self, seq_id: int) -> bytes:
        """The sequence (all layers) as the versioned stream of docs/FORMAT.md."""
        h = self._handle()
        size = ctypes.c_size_t()
        self._check(self._lib.seq_export(h, int(seq_id), None, 0, ctypes.byref(size)),
                    "oscar_seq_export(%d)" % seq_id)
        buf = ctypes.create_string_buffer(max(1, size.value))
        self._check(self._lib.seq_export(h, int(seq_id), buf, size.value, ctypes.byref(size)),
                    "oscar_seq_export(%d)" % seq_id)
        return buf.raw[: size.value]

    def import_seq(self, data) -> int:
        """A new sequence from an export stream (bytes-like); returns its id."""
        h = self._handle()
        if isinstance(data, (bytearray, memoryview)) or (np is not None and isinstance(data, np.ndarray)):
            data = bytes(data)
        if not isinstance(data, bytes):
            raise InvalidArgumentError("import_seq expects bytes, got %s" % type(data).__name__)
        sid = ctypes.c_int32()
        self._check(self._lib.seq_import(h, data, len(data), ctypes.byref(sid)), "oscar_seq_import")
        self._seqs.append(sid.value)
        return sid.value
