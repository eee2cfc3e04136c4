"""torch custom ops over the batch API (``torch.ops.oscar.*``), for torch.compile and CUDA graphs.

Importing this module registers three ops (``torch.library.custom_op``), each
with a fake (meta) implementation, so they trace under ``torch.compile``
(``fullgraph=True``) and can be captured in a CUDA graph:

``torch.ops.oscar.append(handle, layer, k, v, seq_lens, window_slots, block_tables, max_seq_len, key_head_sumsq=None) -> token``
    ``oscar_batch_append``: k, v ``[num_seqs * tokens_per_seq, Hkv, d]``.
``torch.ops.oscar.attention(handle, layer, q, seq_lens, window_slots, block_tables, max_seq_len, softmax_scale, token) -> out``
    ``oscar_batch_attention``: q ``[num_seqs, tokens_per_seq, Hq, d]``; out has q's shape and dtype.
``torch.ops.oscar.key_sumsq(handle, k) -> [rows, Hkv] float32``
    ``oscar_key_sumsq`` (the tensor-parallel norm hook's first phase).

``handle`` is :attr:`oscar.OscarPool.handle` of a pool created with
``caller_metadata=1``; the metadata tensors are int32 (``seq_lens``,
``window_slots`` ``[num_seqs]``, ``block_tables`` ``[num_seqs, stride]``) on
the pool's device, read when the kernels run (CUDA: on
``torch.cuda.current_stream()``, without a sync). ``tokens_per_seq`` is
``k.shape[0] // num_seqs`` (append) or ``q.shape[1]`` (attention).

Why a token: the pool's memory is the library's, invisible to torch, so the
ops are declared functional (no ``mutates_args``: functionalisation would
otherwise clone buffers the library never reads). ``append`` returns an
empty "token" tensor that ``attention`` takes, which orders the attention
after the append it must see and keeps the append from being dropped as
dead code. Use both in that order, once per layer and step.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _lib
from .cache import lib
from .errors import DTypeError, InvalidArgumentError, ShapeError, make_error

_DTYPES = {torch.float32: _lib.DTYPE_F32, torch.float16: _lib.DTYPE_F16,
           torch.bfloat16: _lib.DTYPE_BF16}


def _stream(t: torch.Tensor):
    if t.device.type != "cuda":
        return None
    return torch.cuda.current_stream(t.device).cuda_stream or None


def _check_meta(seq_lens, window_slots, block_tables):
    for name, t in (("seq_lens", seq_lens), ("window_slots", window_slots),
                    ("block_tables", block_tables)):
        if t.dtype != torch.int32:
            raise DTypeError("%s: int32 expected, got %s" % (name, t.dtype))
        if not t.is_contiguous():
            raise ShapeError("%s: must be contiguous" % name)
    if seq_lens.dim() != 1 or window_slots.shape != seq_lens.shape:
        raise ShapeError("seq_lens and window_slots must be [num_seqs]; got %s and %s"
                         % (list(seq_lens.shape), list(window_slots.shape)))
    if block_tables.dim() != 2 or block_tables.shape[0] != seq_lens.shape[0]:
        raise ShapeError("block_tables must be [num_seqs, stride]; got %s for %d sequences"
                         % (list(block_tables.shape), seq_lens.shape[0]))
    if seq_lens.shape[0] < 1:
        raise ShapeError("a batch needs at least one sequence")
    return seq_lens.shape[0]


def _check_rows(name, t, num_seqs):
    if t.dtype not in _DTYPES:
        raise DTypeError("%s: float32, float16 or bfloat16 expected, got %s" % (name, t.dtype))
    if not t.is_contiguous():
        raise ShapeError("%s: must be contiguous" % name)
    if t.dim() != 3 or t.shape[0] % num_seqs or t.shape[0] == 0:
        raise ShapeError("%s: expected [num_seqs * tokens_per_seq, heads, head_dim] with %d "
                         "sequences, got %s" % (name, num_seqs, list(t.shape)))
    return t.shape[0] // num_seqs


def _batch(num_seqs, tokens_per_seq, max_seq_len, seq_lens, window_slots, block_tables,
           key_head_sumsq=None):
    b = _lib.Batch()
    b.num_seqs = num_seqs
    b.tokens_per_seq = tokens_per_seq
    b.max_seq_len = max_seq_len
    b.block_table_stride = block_tables.shape[1]
    b.seq_lens = seq_lens.data_ptr()
    b.window_slots = window_slots.data_ptr()
    b.block_tables = block_tables.data_ptr()
    if key_head_sumsq is not None:
        b.key_head_sumsq = key_head_sumsq.data_ptr()
        b.key_heads_total = key_head_sumsq.shape[1]
    return b


def _raise(handle: int, status: int, what: str):
    L = lib()
    msg = L.last_error(handle)
    raise make_error(status, msg.decode("utf-8", "replace") if msg else "", what)


def _check_handle(handle: int):
    if not handle:
        raise InvalidArgumentError("oscar op: null pool handle (the pool is closed?)")


@torch.library.custom_op("oscar::append", mutates_args=())
def append(handle: int, layer: int, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor,
           window_slots: torch.Tensor, block_tables: torch.Tensor, max_seq_len: int,
           key_head_sumsq: Optional[torch.Tensor] = None) -> torch.Tensor:
    _check_handle(handle)
    n = _check_meta(seq_lens, window_slots, block_tables)
    t = _check_rows("k", k, n)
    if v.shape != k.shape or v.dtype != k.dtype:
        raise ShapeError("v must match k: k %s %s, v %s %s" % (list(k.shape), k.dtype,
                                                             list(v.shape), v.dtype))
    if key_head_sumsq is not None and (key_head_sumsq.dtype != torch.float32
                                       or key_head_sumsq.dim() != 2
                                       or key_head_sumsq.shape[0] != k.shape[0]
                                       or not key_head_sumsq.is_contiguous()):
        raise ShapeError("key_head_sumsq: contiguous float32 [%d, heads_total] expected, got %s %s"
                         % (k.shape[0], key_head_sumsq.dtype, list(key_head_sumsq.shape)))
    b = _batch(n, t, max_seq_len, seq_lens, window_slots, block_tables, key_head_sumsq)
    st = lib().batch_append(handle, layer, b, k.data_ptr(), v.data_ptr(), _DTYPES[k.dtype],
                            _stream(k))
    if st != 0:
        _raise(handle, st, "oscar_batch_append(layer %d)" % layer)
    return seq_lens.new_empty(0)


@append.register_fake
def _append_fake(handle, layer, k, v, seq_lens, window_slots, block_tables, max_seq_len,
                 key_head_sumsq=None):
    n = _check_meta(seq_lens, window_slots, block_tables)
    _check_rows("k", k, n)
    if v.shape != k.shape or v.dtype != k.dtype:
        raise ShapeError("v must match k")
    return seq_lens.new_empty(0)


@torch.library.custom_op("oscar::attention", mutates_args=())
def attention(handle: int, layer: int, q: torch.Tensor, seq_lens: torch.Tensor,
              window_slots: torch.Tensor, block_tables: torch.Tensor, max_seq_len: int,
              softmax_scale: float, token: torch.Tensor) -> torch.Tensor:
    _check_handle(handle)
    n = _check_meta(seq_lens, window_slots, block_tables)
    if q.dim() != 4 or q.shape[0] != n:
        raise ShapeError("q: expected [num_seqs=%d, tokens_per_seq, Hq, d], got %s" % (n, list(q.shape)))
    if q.dtype not in _DTYPES or not q.is_contiguous():
        raise DTypeError("q: contiguous float32/float16/bfloat16 expected, got %s" % q.dtype)
    out = torch.empty_like(q)
    b = _batch(n, q.shape[1], max_seq_len, seq_lens, window_slots, block_tables)
    st = lib().batch_attention(handle, layer, b, q.data_ptr(), _DTYPES[q.dtype], out.data_ptr(),
                               _DTYPES[out.dtype], float(softmax_scale), _stream(q))
    if st != 0:
        _raise(handle, st, "oscar_batch_attention(layer %d)" % layer)
    return out


@attention.register_fake
def _attention_fake(handle, layer, q, seq_lens, window_slots, block_tables, max_seq_len,
                    softmax_scale, token):
    n = _check_meta(seq_lens, window_slots, block_tables)
    if q.dim() != 4 or q.shape[0] != n:
        raise ShapeError("q: expected [num_seqs=%d, tokens_per_seq, Hq, d], got %s" % (n, list(q.shape)))
    return torch.empty_like(q)


@torch.library.custom_op("oscar::key_sumsq", mutates_args=())
def key_sumsq(handle: int, k: torch.Tensor) -> torch.Tensor:
    _check_handle(handle)
    _check_rows("k", k, 1) if k.shape[0] else None
    out = torch.empty(k.shape[0], k.shape[1], dtype=torch.float32, device=k.device)
    st = lib().key_sumsq(handle, k.shape[0], k.data_ptr(), _DTYPES[k.dtype], out.data_ptr(),
                         _stream(k))
    if st != 0:
        _raise(handle, st, "oscar_key_sumsq")
    return out


@key_sumsq.register_fake
def _key_sumsq_fake(handle, k):
    return k.new_empty(k.shape[0], k.shape[1], dtype=torch.float32)


def slot_copy(handle: int, src_slot: int, dst_slot: int, n_tokens: int, device) -> None:
    """oscar_slot_copy on the device's current stream (eager; stream-ordered, no sync)."""
    _check_handle(handle)
    device = torch.device(device)
    stream = torch.cuda.current_stream(device).cuda_stream or None if device.type == "cuda" else None
    st = lib().slot_copy(handle, int(src_slot), int(dst_slot), int(n_tokens), stream)
    if st != 0:
        _raise(handle, st, "oscar_slot_copy(%d -> %d)" % (src_slot, dst_slot))
