"""Hugging Face transformers: a ``Cache`` whose K/V live in the 2-bit OScaR pool.

    import oscar.hf
    oscar.hf.register()                          # explicit: importing has no side effects
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="oscar")
    cache = oscar.hf.OscarHFCache(model.config, max_cache_len=4096)
    out = model.generate(input_ids, attention_mask=mask, past_key_values=cache, max_new_tokens=64)

:func:`register` adds the attention function "oscar" to transformers'
``AttentionInterface`` and a mask function of the same name to its
``AttentionMaskInterface`` (so the 2-D padding mask reaches the attention
function instead of being dropped). The model must use that attention
implementation: ``update()`` keeps no K/V tensors, so no other attention
function could attend over the cache. Attention runs in the library
(``oscar_batch_attention``) over the packed blocks and the window, through the
torch custom ops of :mod:`oscar.ops`.

How generate's modes map onto the pool (the batch API: the cache owns block
tables, lengths and window slots, docs/ENGINES.md):

- **Padded batches.** Each row of the batch is its own sequence with its own
  length. Tokens whose 2-D attention-mask entry is 0 are never appended; a
  query attends to its row's real tokens only (its own and earlier ones).
  The outputs at padding positions are zeros.
- **Chunked prefill.** A chunk of any length is appended and attended in
  pieces of at most 4096 tokens (``oscar.OSCAR_MAX_Q_LEN``). A query sees the
  cache as it is after its piece's append: tokens of completed blocks are
  already quantised (the same values later decode steps see).
- **Assisted / speculative decoding.** ``crop()`` lowers the lengths (exact
  rollback). The removed tokens must still be in the full-precision window:
  create the cache with ``rollback_tokens`` >= the most draft tokens a round
  can reject (``crop`` raises otherwise, and changes nothing).
- **Beam search** (``reorder_cache``) and ``batch_select_indices`` /
  ``batch_repeat_interleave``: a row forks another with ``oscar_slot_copy``
  (one stream-ordered call for all layers, no sync) and shares its packed
  blocks through the block table.
- **torch.compile / CUDA graphs.** A decode step (one new token per row, every
  row real) runs without host work: the lengths are advanced on the device
  and the ops read them when they run. The same holds for a step captured with
  ``torch.cuda.graph`` (pass no attention mask, or one without padding). The
  first forward (the prefill) runs eagerly. ``is_compileable`` is True, so
  ``generate`` compiles decode steps on CUDA by itself. In compiled steps a
  padding token among the new ones fails a device-side assert (eager steps
  handle it). Errors the device finds (non-finite K/V, a full cache) are
  reported by :meth:`OscarHFCache.check`, which eager steps call themselves.

Capacity is fixed at creation, as with transformers' ``StaticCache``:
``max_batch_size`` rows (default: the first batch) of ``max_cache_len``
positions each, counting padding positions.

Supported: decoder-only models whose layers are all full attention (Llama,
Qwen2/3, Mistral without sliding window, ...), on the CPU and CUDA backends.
Anything else (sliding windows, soft-capping, attention sinks, dropout,
custom 4-D masks, packed sequences) raises :class:`oscar.UnsupportedError`.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import transformers

# Tested with transformers 5.17 (the GPU machines) and 5.24 (CI); the Cache,
# AttentionInterface and AttentionMaskInterface hooks used here are 5.x APIs.
SUPPORTED_TRANSFORMERS = ">=5.17,<6"


def _check_transformers_version(version: str) -> None:
    parts = version.split(".")
    try:
        major, minor = int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise ImportError("oscar.hf: cannot parse the transformers version %r" % version)
    if major != 5 or minor < 17:
        raise ImportError("oscar.hf supports transformers %s; this is transformers %s "
                          "(pip install 'transformers%s')" % (SUPPORTED_TRANSFORMERS, version,
                                                               SUPPORTED_TRANSFORMERS))


_check_transformers_version(transformers.__version__)

from transformers.cache_utils import Cache, CacheLayerMixin  # noqa: E402

from . import OscarConfig, OscarPool
from . import ops as _ops  # noqa: F401  (registers torch.ops.oscar.*)
from .errors import InvalidArgumentError, UnsupportedError

ATTN_IMPLEMENTATION = "oscar"
MAX_Q_LEN = 4096  # OSCAR_MAX_Q_LEN: the longest piece one attention call takes

_registered_names: set = set()


def _text_config(config):
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        try:
            return config.get_text_config(decoder=True)
        except TypeError:
            return config.get_text_config()
    return config


def _packed_after(packed: int, n: int, R: int, L: int, S: int = 0) -> int:
    """Blocks packed after a layer reaches n tokens (include/oscar.h, oscar_config): the
    rule reads the tokens after the S sink tokens."""
    n -= min(n, S)
    p = (n - L) // R if n >= L else 0
    return max(packed, p)


class OscarHFLayer(CacheLayerMixin):
    """One layer of :class:`OscarHFCache`. It holds no tensors: the pool is
    shared by all layers and owned by the cache."""

    is_compileable = True
    is_croppable = True
    is_sliding = False

    def __init__(self, owner: "OscarHFCache", layer_idx: int):
        super().__init__()
        self._owner = owner
        self.layer_idx = layer_idx

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return self._owner.update(key_states, value_states, self.layer_idx)

    def get_mask_sizes(self, query_length, *args):
        return self._owner.get_mask_sizes(query_length, self.layer_idx)

    def get_seq_length(self) -> int:
        return self._owner.get_seq_length()

    def get_max_length(self) -> int:
        return self._owner.max_cache_len

    def reset(self) -> None:
        pass

    def crop(self, tokens_to_remove: int) -> None:
        raise UnsupportedError("crop the OscarHFCache, not one of its layers (rows share the pool)")

    def reorder_cache(self, beam_idx) -> None:
        raise UnsupportedError("reorder the OscarHFCache, not one of its layers")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise UnsupportedError("use OscarHFCache.batch_repeat_interleave")

    def batch_select_indices(self, indices) -> None:
        raise UnsupportedError("use OscarHFCache.batch_select_indices")


class OscarHFCache(Cache):
    """A transformers ``Cache`` whose K/V live in a 2-bit OScaR pool (:class:`oscar.OscarPool`).

    ``OscarHFCache(config, max_cache_len=8192, max_batch_size=None, method="oscar",
    bits=2, residual=128, rollback_tokens=0, window_dtype=None, tp_group=None, ...)``

    ``config``: the model's config (layers, heads and head_dim are read from it;
    or pass ``num_layers``, ``num_kv_heads``, ``num_q_heads``, ``head_dim``). The
    pool is created at the first forward, on the device of the first key tensor
    (the CUDA backend for CUDA tensors), with ``window_dtype`` defaulting to the
    key dtype. ``max_cache_len``: positions per row, padding included.
    ``rollback_tokens``: how many tokens ``crop`` can remove (assisted
    decoding), see :mod:`oscar.hf`. ``tp_group``: a torch.distributed process
    group for tensor parallelism (each rank holds some KV heads; key norms are
    all-gathered over the group, docs/ENGINES.md). Other keyword arguments go to
    :class:`oscar.OscarConfig` (k_group, v_group, num_threads, check_finite, ...).
    """

    def __init__(self, config=None, *, max_cache_len: int = 8192, max_batch_size: Optional[int] = None,
                 method="oscar", bits: int = 2, residual: int = 128, rollback_tokens: int = 0,
                 window_dtype=None, tp_group=None, compileable: bool = True,
                 num_layers: Optional[int] = None, num_kv_heads: Optional[int] = None,
                 num_q_heads: Optional[int] = None, head_dim: Optional[int] = None,
                 attention: Optional[str] = None, max_tokens: Optional[int] = None, **oscar_kwargs):
        if attention not in (None, "fused"):
            raise UnsupportedError(
                "attention=%r: OscarHFCache attends in the library only (the former 'dequant' "
                "mode kept a full-precision copy of K/V and is gone); load the model with "
                "attn_implementation='oscar' after oscar.hf.register()" % (attention,))
        if max_tokens is not None:  # the former name
            max_cache_len = max_tokens
        tc = _text_config(config)
        if tc is not None:
            layer_types = getattr(tc, "layer_types", None)
            if layer_types and any(t != "full_attention" for t in layer_types):
                raise UnsupportedError("OscarHFCache supports full-attention layers only; the model has %s"
                                       % sorted(set(layer_types)))
            if (getattr(tc, "sliding_window", None) and getattr(tc, "use_sliding_window", True)
                    and not layer_types):
                raise UnsupportedError("OscarHFCache does not support sliding-window attention "
                                       "(config.sliding_window = %s)" % tc.sliding_window)
            impl = getattr(tc, "_attn_implementation", None)
            if impl is not None and impl not in _registered_names:
                raise UnsupportedError(
                    "the model uses attn_implementation=%r, but OscarHFCache keeps no K/V tensors for "
                    "it to attend over: call oscar.hf.register() and load the model with "
                    "attn_implementation='oscar' (or model.set_attn_implementation('oscar'))" % impl)
            num_layers = num_layers or tc.num_hidden_layers
            num_q_heads = num_q_heads or tc.num_attention_heads
            num_kv_heads = num_kv_heads or getattr(tc, "num_key_value_heads", None) or num_q_heads
            head_dim = head_dim or getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        if None in (num_layers, num_q_heads, num_kv_heads, head_dim):
            raise InvalidArgumentError("OscarHFCache needs the model config (or num_layers, "
                                       "num_q_heads, num_kv_heads and head_dim)")
        if int(max_cache_len) < 1:
            raise InvalidArgumentError("max_cache_len must be >= 1, got %r" % (max_cache_len,))
        # Stored under private names: transformers 5.17's Cache has read-only properties
        # of the public ones (overridden below).
        self._max_cache_len = int(max_cache_len)
        self._max_batch_arg = None if max_batch_size is None else int(max_batch_size)
        self.tp_group = tp_group
        self._compileable = bool(compileable)
        tp = 1
        if tp_group is not None:
            import torch.distributed as dist
            tp = dist.get_world_size(tp_group)
            if num_kv_heads % tp or num_q_heads % tp:
                raise InvalidArgumentError("%d KV heads and %d query heads do not split over %d ranks"
                                           % (num_kv_heads, num_q_heads, tp))
        self._tp = tp
        oscar_kwargs.setdefault("k_group", min(32, int(residual)))  # must divide R
        # The heads one rank holds (all of them without tensor parallelism).
        self._spec = dict(method=method, bits=bits, residual=residual, num_layers=num_layers,
                          num_q_heads=num_q_heads // tp, num_kv_heads=num_kv_heads // tp,
                          head_dim=head_dim, rollback_tokens=rollback_tokens, **oscar_kwargs)
        self._window_dtype = window_dtype
        # Validate eagerly (shapes, groups, R, L ...), without allocating.
        OscarConfig(window_dtype=window_dtype or "f16", caller_metadata=1, **self._spec).validate()
        self.pool: Optional[OscarPool] = None
        self._R = int(residual)
        self._L = int(rollback_tokens)
        self._S = int(oscar_kwargs.get("sink_tokens") or 0)   # blocks start after the sinks
        self._nb = self.max_cache_len // self._R + 1   # table entries: seq_len / R <= nb - 1
        self._reset_host_state()
        layers = [OscarHFLayer(self, i) for i in range(num_layers)]
        super().__init__(layers=layers)

    # ---- host state -------------------------------------------------------------
    def _reset_host_state(self) -> None:
        self._rows = 0               # batch rows in use
        self._hf_len = 0             # positions transformers sees (padding included), every row
        self._lens: list = []        # real tokens per row (every layer)
        self._packed: list = []      # blocks packed per row (P)
        self._slots: list = []       # window slot per row
        self._tables: list = []      # block table per row (nb entries)
        self._stale = False          # device lengths advanced by compiled steps
        self._pending = None         # (layer, key) from update() until attention consumes it
        self._plan = None            # the current forward's append/attention calls

    def _setup_pool(self, key_states: torch.Tensor, num_q_heads: int) -> None:
        B, hkv, _, d = key_states.shape
        spec = dict(self._spec)
        if hkv != spec["num_kv_heads"] or d != spec["head_dim"] or num_q_heads != spec["num_q_heads"]:
            raise InvalidArgumentError(
                "the model's attention has %d query heads and %d KV heads of dim %d on this rank; the "
                "cache was built for %d, %d and %d" % (num_q_heads, hkv, d, spec["num_q_heads"],
                                                      spec["num_kv_heads"], spec["head_dim"]))
        rows = self._max_batch_arg or B
        if B > rows:
            raise InvalidArgumentError("batch of %d rows, the cache holds max_batch_size = %d" % (B, rows))
        device = key_states.device
        cuda = device.type == "cuda"
        cfg = OscarConfig(window_dtype=self._window_dtype or key_states.dtype, caller_metadata=1,
                          block_count=rows * self._nb, max_seqs=2 * rows,
                          backend="cuda" if cuda else "cpu",
                          device=(device.index if device.index is not None else torch.cuda.current_device())
                          if cuda else 0, **spec)
        need = cfg.memory_requirements()
        align = need["alignment"]
        memory = {}
        for name in ("pool", "windows", "workspace"):
            raw = torch.zeros(need[name] + align, dtype=torch.uint8, device=device)
            off = (-raw.data_ptr()) % align
            memory[name] = raw[off:off + need[name]]
        self.pool = OscarPool(cfg, memory=memory)
        self._handle = self.pool.handle
        self._device = device
        self._max_rows = rows
        self._lens_dev = torch.zeros(rows, dtype=torch.int32, device=device)
        self._slots_dev = torch.zeros(rows, dtype=torch.int32, device=device)
        self._tables_dev = torch.zeros(rows, self._nb, dtype=torch.int32, device=device)
        for t in (self._lens_dev, self._slots_dev, self._tables_dev):
            # cudagraphs (mode="reduce-overhead") read these in place across replays
            torch._dynamo.mark_static_address(t)
        self._refs = [0] * (rows * self._nb)
        self._free_blocks = list(range(rows * self._nb - 1, -1, -1))
        self._free_slots = list(range(2 * rows - 1, -1, -1))

    def _start_rows(self, B: int) -> None:
        """B empty rows: a slot and a full table of fresh blocks each."""
        if B > self._max_rows:
            raise InvalidArgumentError("batch of %d rows, the cache holds max_batch_size = %d"
                                       % (B, self._max_rows))
        self._rows = B
        self._lens = [0] * B
        self._packed = [0] * B
        self._slots = [self._free_slots.pop() for _ in range(B)]
        self._tables = [[self._take_block() for _ in range(self._nb)] for _ in range(B)]
        self._upload_rows()

    def _take_block(self) -> int:
        b = self._free_blocks.pop()
        self._refs[b] += 1
        return b

    def _drop_block(self, b: int) -> None:
        self._refs[b] -= 1
        if self._refs[b] == 0:
            self._free_blocks.append(b)

    def _upload_rows(self) -> None:
        B = self._rows
        if B == 0:
            return
        self._lens_dev[:B].copy_(torch.tensor(self._lens, dtype=torch.int32))
        self._slots_dev[:B].copy_(torch.tensor(self._slots, dtype=torch.int32))
        self._tables_dev[:B].copy_(torch.tensor(self._tables, dtype=torch.int32))

    def _refresh(self) -> None:
        """Brings the host mirror up to date after compiled steps (one device read)."""
        if not self._stale:
            return
        lens = self._lens_dev[: self._rows].tolist()
        grown = lens[0] - self._lens[0] if self._rows else 0
        for i, n in enumerate(lens):
            if n - self._lens[i] != grown:
                raise InvalidArgumentError("the device lengths grew unevenly (%s -> %s)" % (self._lens, lens))
            self._packed[i] = _packed_after(self._packed[i], n, self._R, self._L, self._S)
        self._lens = lens
        self._hf_len += grown
        self._stale = False
        self.check()
        if self._hf_len > self.max_cache_len:
            raise InvalidArgumentError("the cache is full: %d positions written, max_cache_len = %d"
                                       % (self._hf_len, self.max_cache_len))

    # ---- what transformers calls ---------------------------------------------------
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Hands this layer's new K/V to the oscar attention function, which appends the real
        (unpadded) tokens and attends. Returns them unchanged; nothing else may attend over them."""
        if self._pending is not None:
            raise UnsupportedError(
                "layer %d: update() again before the attention of layer %d ran: the model does not "
                "use attn_implementation='oscar' (call oscar.hf.register() and load the model with it)"
                % (layer_idx, self._pending[0]))
        self._pending = (layer_idx, key_states, value_states)
        _set_current(self)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        self._refresh()
        return self._hf_len

    def get_mask_sizes(self, query_length, layer_idx: int = 0):
        # Only the "oscar" mask function reads these, and it ignores them: constants keep
        # compiled steps free of guards on the length.
        return self.max_cache_len, 0

    def get_query_offset(self, layer_idx: int = 0):
        return 0

    def get_max_length(self, layer_idx=None) -> int:
        return self.max_cache_len

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_cache_len

    @property
    def max_cache_len(self) -> int:
        """Positions per row (padding included) the cache was created for."""
        return self._max_cache_len

    @property
    def max_batch_size(self) -> int:
        """Rows the pool holds (the first batch's size until the pool exists, if not given)."""
        return getattr(self, "_max_rows", None) or self._max_batch_arg or self._rows

    @property
    def batch_size(self) -> int:
        return self._rows

    @property
    def is_compileable(self) -> bool:
        return self._compileable and self._tp == 1

    @property
    def is_croppable(self) -> bool:
        return True

    @property
    def seq_lengths(self) -> list:
        """Real (unpadded) tokens held per batch row."""
        self._refresh()
        return list(self._lens)

    def check(self) -> None:
        """Raises what the device reported since the last check (oscar_poll, no sync):
        non-finite K/V (NonFiniteError) or bad metadata such as a full cache."""
        if self.pool is not None:
            self.pool.poll()

    def memory(self):
        """The pool's :class:`oscar.MemoryStats` (None before the first forward). The
        pool is allocated whole at the first forward (max_batch_size x max_cache_len)."""
        return None if self.pool is None else self.pool.memory()

    # ---- crop, beams, batch selection ---------------------------------------------------
    def crop(self, max_length: int) -> None:
        """Removes ``-max_length`` positions when negative (transformers >= 5.2x: ``crop(0)``
        is a no-op), keeps the first ``max_length`` when positive (the older meaning).
        Exact: the removed tokens must still be in the window (``rollback_tokens``);
        otherwise UnsupportedError and nothing changes."""
        self._refresh()
        max_length = int(max_length)   # transformers 5.17's assisted decoding passes a tensor
        if max_length == 0:
            return
        new_len = self._hf_len + max_length if max_length < 0 else max_length
        if new_len >= self._hf_len:
            return
        if new_len < 0:
            raise InvalidArgumentError("crop(%d): the cache holds %d positions" % (max_length, self._hf_len))
        remove = self._hf_len - new_len
        kept = []
        for i in range(self._rows):
            n = self._lens[i] - remove
            floor = self._S + self._packed[i] * self._R if self._packed[i] else 0  # sinks + blocks
            if n < floor:
                raise UnsupportedError(
                    "crop(%d): row %d would keep %d tokens, but its first %d are already quantised "
                    "into immutable blocks; create the cache with rollback_tokens >= %d (now %d) to "
                    "remove that many tokens" % (max_length, i, max(n, 0), floor, remove, self._L))
            kept.append(n)
        self._lens = kept
        self._hf_len = new_len
        self._upload_rows()

    def reorder_cache(self, beam_idx) -> None:
        self._reseat(beam_idx)

    def batch_select_indices(self, indices) -> None:
        idx = torch.as_tensor(indices).reshape(-1)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().reshape(-1)
        self._reseat(idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._reseat([i for i in range(self._rows) for _ in range(repeats)])

    def _reseat(self, index) -> None:
        """New row i = old row index[i]: a slot copy (all layers, stream-ordered) and the
        packed blocks shared through the table; later blocks are fresh."""
        if self.pool is None or self._rows == 0:
            return
        self._refresh()
        idx = [int(i) for i in (index.tolist() if hasattr(index, "tolist") else index)]
        if any(i < 0 or i >= self._rows for i in idx):
            raise InvalidArgumentError("reorder index %s out of range for %d rows" % (idx, self._rows))
        if len(idx) > self._max_rows:
            raise InvalidArgumentError("%d rows requested, the cache holds max_batch_size = %d"
                                       % (len(idx), self._max_rows))
        old_slots, old_tables = self._slots, self._tables
        shared = []
        for src in idx:
            head = old_tables[src][: self._packed[src]]
            for b in head:
                self._refs[b] += 1
            shared.append(head)
        new_slots = [self._free_slots.pop() for _ in idx]
        for dst, src in zip(new_slots, idx):
            _ops.slot_copy(self._handle, old_slots[src], dst, self._lens[src], self._device)
        for t in old_tables:
            for b in t:
                self._drop_block(b)
        self._free_slots.extend(old_slots)
        self._tables = [head + [self._take_block() for _ in range(self._nb - len(head))] for head in shared]
        self._slots = new_slots
        self._lens = [self._lens[s] for s in idx]
        self._packed = [self._packed[s] for s in idx]
        self._rows = len(idx)
        self._upload_rows()

    def reset(self) -> None:
        if self.pool is not None:
            for t in self._tables:
                for b in t:
                    self._drop_block(b)
            self._free_slots.extend(self._slots)
        self._reset_host_state()

    def close(self) -> None:
        """Frees the pool now (otherwise when the cache is garbage-collected)."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        self._reset_host_state()

    # ---- one forward's plan ---------------------------------------------------------------
    def _begin_forward(self, query, key, attention_mask):
        B, hq, T, _ = query.shape
        if self.pool is None:
            self._setup_pool(key, hq)
        if self._rows == 0:
            if torch.compiler.is_compiling() or (query.is_cuda and torch.cuda.is_current_stream_capturing()):
                raise UnsupportedError("the first forward (the prefill) of an OscarHFCache must run "
                                       "eagerly, outside torch.compile and CUDA graph capture")
            self._start_rows(B)
        if B != self._rows:
            raise InvalidArgumentError("batch of %d rows, the cache holds %d: reorder or select rows "
                                       "with the cache's methods first" % (B, self._rows))
        if attention_mask is not None and attention_mask.dim() != 2:
            raise UnsupportedError("oscar attention takes the 2-D padding mask only; got a %d-D mask"
                                   % attention_mask.dim())
        # is_compiling() first: dynamo must not trace the capture query.
        if torch.compiler.is_compiling() or (query.is_cuda and torch.cuda.is_current_stream_capturing()):
            # No host work: every row appends its T new tokens; lengths advance on the device.
            if T > MAX_Q_LEN:
                raise UnsupportedError("compiled steps take at most %d new tokens, got %d" % (MAX_Q_LEN, T))
            if attention_mask is not None:
                # With a message: the variant compilers keep (the bare one is dropped as dead code).
                torch._assert_async(attention_mask[:, -T:].all(),
                                    "oscar: a compiled step got padding among its new tokens; "
                                    "run steps with padding eagerly")
            self._lens_dev[:B].add_(T)
            self._stale = True
            return ("all", T)
        self._refresh()
        self.check()
        if self._hf_len + T > self.max_cache_len:
            raise InvalidArgumentError("the cache is full: %d + %d positions > max_cache_len = %d"
                                       % (self._hf_len, T, self.max_cache_len))
        if attention_mask is None:
            new = None
        else:
            m = attention_mask.to(device="cpu", dtype=torch.bool)
            if m.shape != (B, self._hf_len + T):
                raise InvalidArgumentError(
                    "attention mask of shape %s, expected [%d, %d] (positions in the cache + new)"
                    % (list(m.shape), B, self._hf_len + T))
            past = m[:, : self._hf_len].sum(dim=1).tolist()
            if past != self._lens:
                raise InvalidArgumentError("the attention mask marks %s earlier tokens as real, the cache "
                                           "holds %s" % (past, self._lens))
            new = m[:, self._hf_len:]
            if bool(new.all()):
                new = None
        before = list(self._lens)
        if new is None and T <= MAX_Q_LEN:
            plan = ("all", T)
            self._lens = [n + T for n in before]
        else:
            plan = ("pieces", self._pieces(new, B, T, before))
            self._lens = [n + (T if new is None else int(new[i].sum())) for i, n in enumerate(before)]
        self._packed = [_packed_after(p, n, self._R, self._L, self._S)
                        for p, n in zip(self._packed, self._lens)]
        self._hf_len += T
        self._lens_dev[:B].copy_(torch.tensor(self._lens, dtype=torch.int32))
        return plan

    def _pieces(self, new, B, T, before):
        """The calls of a forward with padding or more than MAX_Q_LEN new tokens: rows grouped
        by their number of real new tokens, each group's tokens in pieces of <= MAX_Q_LEN."""
        positions = [list(range(T)) if new is None else new[i].nonzero().reshape(-1).tolist()
                     for i in range(B)]
        groups: dict = {}
        for i, pos in enumerate(positions):
            if pos:
                groups.setdefault(len(pos), []).append(i)
        dev = self._device
        calls = []
        for n, rows in sorted(groups.items()):
            rows_t = torch.tensor(rows, dtype=torch.long, device=dev)
            slots = self._slots_dev.index_select(0, rows_t)
            tables = self._tables_dev.index_select(0, rows_t).contiguous()
            for start in range(0, n, MAX_Q_LEN):
                stop = min(n, start + MAX_Q_LEN)
                flat = [r * T + p for r in rows for p in positions[r][start:stop]]
                lens = torch.tensor([before[r] + stop for r in rows], dtype=torch.int32, device=dev)
                calls.append((torch.tensor(flat, dtype=torch.long, device=dev), len(rows), stop - start,
                              lens, slots, tables))
        return calls

    # ---- attention ---------------------------------------------------------------------
    def _append(self, layer, kf, vf, lens, slots, tables):
        sums = None
        if self._tp > 1:
            sums = self._gathered_key_sums(kf)
        return torch.ops.oscar.append(self._handle, layer, kf, vf, lens, slots, tables,
                                      self.max_cache_len, sums)

    def _gathered_key_sums(self, kf):
        """Phase 1 of the tensor-parallel append: every rank's per-head key sums of
        squares, all-gathered over tp_group into head order [rows, all heads]."""
        part = torch.ops.oscar.key_sumsq(self._handle, kf)                       # [rows, LH]
        rows, lh = part.shape
        if torch.compiler.is_compiling():
            from torch.distributed import _functional_collectives as funcol
            gathered = funcol.all_gather_tensor(part, 0, self.tp_group)
        else:
            import torch.distributed as dist
            gathered = part.new_empty(self._tp * rows, lh)
            dist.all_gather_into_tensor(gathered, part, group=self.tp_group)
        return gathered.view(self._tp, rows, lh).transpose(0, 1).reshape(rows, self._tp * lh).contiguous()

    def _attend(self, layer, query, key, value, attention_mask, scale):
        B, hq, T, d = query.shape
        hkv = key.shape[1]
        if layer == 0:
            self._plan = self._begin_forward(query, key, attention_mask)
        elif self._plan is None:
            raise InvalidArgumentError("oscar attention: layer %d ran before layer 0 of this forward" % layer)
        kind, arg = self._plan
        if kind == "all":
            if arg != T:
                raise InvalidArgumentError("layer %d has %d new tokens, layer 0 had %d" % (layer, T, arg))
            kf = key.transpose(1, 2).reshape(B * T, hkv, d).contiguous()
            vf = value.transpose(1, 2).reshape(B * T, hkv, d).contiguous()
            qf = query.transpose(1, 2).contiguous()
            lens, slots, tables = self._lens_dev[:B], self._slots_dev[:B], self._tables_dev[:B]
            token = self._append(layer, kf, vf, lens, slots, tables)
            return torch.ops.oscar.attention(self._handle, layer, qf, lens, slots, tables,
                                             self.max_cache_len, scale, token)
        kf = key.transpose(1, 2).reshape(B * T, hkv, d)
        vf = value.transpose(1, 2).reshape(B * T, hkv, d)
        qf = query.transpose(1, 2).reshape(B * T, hq, d)
        out = torch.zeros(B * T, hq, d, dtype=query.dtype, device=query.device)
        for flat, nrows, n, lens, slots, tables in arg:
            kc = kf.index_select(0, flat).contiguous()
            vc = vf.index_select(0, flat).contiguous()
            qc = qf.index_select(0, flat).reshape(nrows, n, hq, d).contiguous()
            token = self._append(layer, kc, vc, lens, slots, tables)
            oc = torch.ops.oscar.attention(self._handle, layer, qc, lens, slots, tables,
                                           self.max_cache_len, scale, token)
            out.index_copy_(0, flat, oc.reshape(nrows * n, hq, d))
        return out.reshape(B, T, hq, d)


# ---- the attention and mask functions -------------------------------------------------

_current = [None]  # the OscarHFCache whose update() ran last (one forward at a time)


def _set_current(cache) -> None:
    _current[0] = cache


def oscar_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            **kwargs):
    """transformers AttentionInterface function: appends the new K/V of an
    :class:`OscarHFCache` and attends over the pool (``torch.ops.oscar``).
    ``query``: [B, Hq, T, d] (post-RoPE); returns ([B, T, Hq, d], None)."""
    cache = _current[0]
    if cache is None or cache._pending is None or cache._pending[1] is not key:
        raise UnsupportedError(
            "oscar attention was called with K/V that no OscarHFCache handed over: pass "
            "past_key_values=OscarHFCache(...) with use_cache=True (oscar attention has no "
            "cache-free path)")
    layer, _, _ = cache._pending
    if getattr(module, "layer_idx", layer) != layer:
        raise InvalidArgumentError("attention of layer %s got the K/V of layer %d"
                                   % (getattr(module, "layer_idx", None), layer))
    cache._pending = None
    if dropout:
        raise UnsupportedError("oscar attention does not support attention dropout (model.eval())")
    for name in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise UnsupportedError("oscar attention does not support %s (got %r)" % (name, kwargs[name]))
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out = cache._attend(layer, query, key, value, attention_mask, float(scaling))
    return out, None


def oscar_mask(batch_size, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None,
               attention_mask=None, **kwargs):
    """transformers AttentionMaskInterface function: hands the 2-D padding mask
    ([B, positions], bool) to the attention function unchanged (None: no padding)."""
    from transformers.masking_utils import causal_mask_function
    if mask_function is not None and mask_function is not causal_mask_function:
        raise UnsupportedError("oscar attention supports the plain causal mask with padding only "
                               "(not packed sequences, sliding windows or custom mask functions)")
    return attention_mask


def register(name: str = ATTN_IMPLEMENTATION) -> str:
    """Registers the oscar attention function and its mask function with transformers
    under ``name`` (default "oscar"); returns the name. Call it before loading a model
    with ``attn_implementation=name``. Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(name, oscar_attention_forward)
    AttentionMaskInterface.register(name, oscar_mask)
    _registered_names.add(name)
    return name


def register_attention(name: str = ATTN_IMPLEMENTATION) -> str:
    """Deprecated name of :func:`register`."""
    warnings.warn("oscar.hf.register_attention is deprecated; use oscar.hf.register",
                  DeprecationWarning, stacklevel=2)
    return register(name)


def __getattr__(name):
    if name == "OscarCache":
        warnings.warn("oscar.hf.OscarCache is deprecated: the transformers Cache is "
                      "oscar.hf.OscarHFCache (oscar.OscarPool is the paged pool)",
                      DeprecationWarning, stacklevel=2)
        return OscarHFCache
    raise AttributeError("module 'oscar.hf' has no attribute %r" % name)
