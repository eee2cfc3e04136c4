"""Hugging Face transformers drop-in: a ``Cache`` backed by the 2-bit OScaR store.

    from oscar.hf import OscarHFCache
    cache = OscarHFCache(model.config)
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=64)

Two ways to serve attention, chosen with ``attention=``:

``"dequant"`` (default; works with every attention implementation: sdpa,
eager, flash ...). ``update()`` appends the new K/V to the OScaR cache and
returns full K/V tensors the way ``DynamicCache`` does: tokens still in the
full-precision residual window are returned exactly as they came in (so while
a sequence is shorter than ``residual`` tokens the model's output is
bit-identical to ``DynamicCache``), and every token that has been quantised
into a block is replaced by its dequantised value (``oscar_seq_read``, read
once per flushed block, not once per step). The cost: this keeps a
model-dtype copy of K/V next to the 2-bit store, so it does *not* save memory
(peak KV memory is that of DynamicCache plus the 2-bit pool) and attention
runs in the model's usual kernel; it gives the accuracy of the 2-bit cache.

``"fused"`` (the memory-saving path). Load the model with
``attn_implementation="oscar"`` (call :func:`register_attention` first, or
import this module, which registers it). ``update()`` then only appends to the
OScaR cache and keeps no K/V tensors; the registered attention function calls
``oscar_attention`` directly on the packed blocks plus window (the CUDA
backend's decode kernel on GPU). Limits: no attention mask is applied, so
batches must be unpadded (all rows the same length, e.g. batch 1); prompts
longer than 4096 tokens are only supported on an empty cache (the prefill then
uses torch's SDPA over the exact new K/V); the output matches DynamicCache up
to float rounding while tokens are in the window (the window holds rotated
K/V, attention is computed in rotated space) and within the quantisation
error after.

Both modes: sequences of the batch map to OScaR sequences; beam search and
batch expansion use ``oscar_seq_fork`` (packed blocks shared); ``crop`` (used
by assisted decoding) is not supported. Only full-attention models (Llama,
Qwen2/3, Mistral without sliding window, ...) are supported.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from transformers.cache_utils import Cache, DynamicLayer

from . import OscarCache as _PagedCache, OscarConfig
from .errors import InvalidArgumentError

ATTN_IMPLEMENTATION = "oscar"
MAX_Q_LEN = 4096  # oscar_attention's q_len limit


def _text_config(config):
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        try:
            return config.get_text_config(decoder=True)
        except TypeError:
            return config.get_text_config()
    return config


class OscarHFLayer(DynamicLayer):
    """One layer of :class:`OscarHFCache`. In "dequant" mode ``keys``/``values``
    hold what update() returns ([batch, Hkv, tokens, head_dim], model dtype);
    in "fused" mode they stay empty and only ``cumulative_length`` grows."""

    is_croppable = False
    is_compileable = False
    is_sliding = False

    def __init__(self, owner: "OscarHFCache", layer_idx: int):
        super().__init__()
        self._owner = owner
        self.layer_idx = layer_idx
        self.cumulative_length = 0
        self.packed = 0  # tokens of `keys` already replaced by their dequantised values

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self.dtype = key_states.dtype

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        owner = self._owner
        B, Hkv, T, d = key_states.shape
        oc = owner._ensure(B, Hkv, d, key_states)
        # HF layout [B, Hkv, T, d] -> oscar's token-major [B*T, Hkv, d] (one copy).
        k = key_states.transpose(1, 2).reshape(B * T, Hkv, d).contiguous()
        v = value_states.transpose(1, 2).reshape(B * T, Hkv, d).contiguous()
        before = self.cumulative_length
        if T > 0:
            oc.append(self.layer_idx, owner.seq_ids, [T] * B, k, v)
        self.cumulative_length += T
        if owner.attention_mode == "fused":
            # Tag the tensors so the registered attention function can find the cache.
            key_states._oscar_ctx = (owner, self.layer_idx, before)
            return key_states, value_states
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self._refresh_packed(oc)
        return self.keys, self.values

    def _refresh_packed(self, oc: _PagedCache) -> None:
        R = oc._cc.residual
        packed = self.cumulative_length // R * R
        if packed <= self.packed:
            return
        start, count = self.packed, packed - self.packed
        for b, sid in enumerate(self._owner.seq_ids):
            kd, vd = oc.read(sid, self.layer_idx, start, count)
            kt = torch.from_numpy(kd).to(device=self.keys.device, dtype=self.keys.dtype)
            vt = torch.from_numpy(vd).to(device=self.values.device, dtype=self.values.dtype)
            self.keys[b, :, start:packed, :] = kt.transpose(0, 1)
            self.values[b, :, start:packed, :] = vt.transpose(0, 1)
        self.packed = packed

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def reset(self) -> None:
        # Drop (not zero) the tensors: update() grows them by concatenation.
        self.keys = self.values = None
        self.is_initialized = False
        self.cumulative_length = 0
        self.packed = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("OscarHFCache cannot crop: packed blocks are immutable")

    def _select(self, index: torch.Tensor) -> None:
        if self.is_initialized and self.keys is not None and self.keys.numel() > 0:
            self.keys = self.keys.index_select(0, index.to(self.keys.device))
            self.values = self.values.index_select(0, index.to(self.values.device))

    # batch reshuffles are driven by the cache (sequences span all layers)
    def reorder_cache(self, beam_idx) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices) -> None:
        self._select(torch.as_tensor(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized and self.keys is not None and self.keys.numel() > 0:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)


class OscarHFCache(Cache):
    """A transformers ``Cache`` whose K/V live in a 2-bit OScaR cache.

    ``OscarHFCache(config, method="oscar", bits=2, residual=128, ...)`` where
    ``config`` is the model's config (num layers / heads / head_dim are read
    from it; or pass ``num_layers``, ``num_kv_heads``, ``num_q_heads``,
    ``head_dim``). The OScaR cache itself is created at the first update,
    on the device of the first key tensor (CUDA backend for CUDA tensors),
    with ``window_dtype`` defaulting to the model's dtype and ``block_count``
    defaulting to enough blocks for ``max_tokens`` tokens per batch row.
    ``attention``: "dequant" (default) or "fused"; see the module docstring.
    Other keyword arguments go to :class:`oscar.OscarConfig` (k_group,
    v_group, num_threads, check_finite, rotate_values, ...).
    """

    def __init__(self, config=None, *, method="oscar", bits: int = 2, residual: int = 128,
                 window_dtype=None, max_tokens: int = 8192, block_count: Optional[int] = None,
                 max_seqs: Optional[int] = None, attention: str = "dequant",
                 num_layers: Optional[int] = None, num_kv_heads: Optional[int] = None,
                 num_q_heads: Optional[int] = None, head_dim: Optional[int] = None,
                 **oscar_kwargs):
        tc = _text_config(config)
        if tc is not None:
            layer_types = getattr(tc, "layer_types", None)
            if layer_types and any(t != "full_attention" for t in layer_types):
                raise InvalidArgumentError(
                    "OscarHFCache supports full-attention layers only; the model has %s"
                    % sorted(set(layer_types)))
            if getattr(tc, "sliding_window", None) and getattr(tc, "use_sliding_window", True) \
                    and layer_types is None and getattr(tc, "model_type", "") == "mistral":
                raise InvalidArgumentError("OscarHFCache does not support sliding-window attention")
            num_layers = num_layers or tc.num_hidden_layers
            num_q_heads = num_q_heads or tc.num_attention_heads
            num_kv_heads = num_kv_heads or getattr(tc, "num_key_value_heads", None) or num_q_heads
            head_dim = head_dim or getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        if None in (num_layers, num_q_heads, num_kv_heads, head_dim):
            raise InvalidArgumentError("OscarHFCache needs the model config (or num_layers, "
                                       "num_q_heads, num_kv_heads and head_dim)")
        if attention not in ("dequant", "fused"):
            raise InvalidArgumentError("attention must be 'dequant' or 'fused', got %r" % attention)
        self.attention_mode = attention
        self.max_tokens = int(max_tokens)
        self._block_count = block_count
        self._max_seqs = max_seqs
        self._spec = dict(method=method, bits=bits, residual=residual, num_layers=num_layers,
                          num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                          **oscar_kwargs)
        self._window_dtype = window_dtype
        # Validate eagerly (shapes, groups ...), without allocating.
        OscarConfig(window_dtype=window_dtype or "f16", **self._spec).validate()
        self.oscar: Optional[_PagedCache] = None
        self.seq_ids: list = []
        layers = [OscarHFLayer(self, i) for i in range(num_layers)]
        super().__init__(layers=layers)

    # ---- the OScaR cache -------------------------------------------------------
    def _ensure(self, batch: int, hkv: int, d: int, like: torch.Tensor) -> _PagedCache:
        spec = self._spec
        if hkv != spec["num_kv_heads"] or d != spec["head_dim"]:
            raise InvalidArgumentError("key states have %d heads of dim %d; the cache was built for "
                                       "%d x %d" % (hkv, d, spec["num_kv_heads"], spec["head_dim"]))
        if self.oscar is None:
            R = spec["residual"]
            per_seq = math.ceil(self.max_tokens / R)
            block_count = self._block_count or max(1, batch * per_seq)
            max_seqs = self._max_seqs or (2 * batch + 8)
            if like.is_cuda:
                backend, device = "cuda", like.device.index or 0
            else:
                backend, device = "cpu", 0
            self.oscar = _PagedCache(window_dtype=self._window_dtype or like.dtype,
                                    block_count=block_count, max_seqs=max_seqs,
                                    backend=backend, device=device, **spec)
        if not self.seq_ids:
            self.seq_ids = self.oscar.add_seqs(batch)
        elif len(self.seq_ids) != batch:
            raise InvalidArgumentError("batch size changed from %d to %d without a cache reorder"
                                       % (len(self.seq_ids), batch))
        return self.oscar

    def _reseat(self, index) -> None:
        """New sequence list seq_ids[index[i]] (forks), then free the old ones."""
        if not self.seq_ids:
            return
        idx = [int(i) for i in (index.tolist() if hasattr(index, "tolist") else index)]
        old = self.seq_ids
        new = []
        try:
            for i in idx:
                new.append(self.oscar.fork(old[i]))
        except Exception:
            for s in new:
                self.oscar.free(s)
            raise
        for s in old:
            self.oscar.free(s)
        self.seq_ids = new

    def reorder_cache(self, beam_idx) -> None:
        self._reseat(beam_idx)
        for layer in self.layers:
            layer.reorder_cache(beam_idx)

    def batch_select_indices(self, indices) -> None:
        idx = torch.as_tensor(indices).reshape(-1)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().reshape(-1)
        self._reseat(idx)
        for layer in self.layers:
            layer.batch_select_indices(idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        n = len(self.seq_ids)
        self._reseat([i for i in range(n) for _ in range(repeats)])
        for layer in self.layers:
            layer.batch_repeat_interleave(repeats)

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("OscarHFCache cannot crop (packed blocks are immutable); "
                                  "assisted decoding is not supported")

    def reset(self) -> None:
        if self.oscar is not None:
            for s in self.seq_ids:
                self.oscar.free(s)
        self.seq_ids = []
        for layer in self.layers:
            layer.reset()

    @property
    def is_compileable(self) -> bool:
        return False

    def memory(self):
        """The OScaR pool's :class:`oscar.MemoryStats` (None before the first update)."""
        return None if self.oscar is None else self.oscar.memory()

    def close(self) -> None:
        if self.oscar is not None:
            self.oscar.close()
            self.oscar = None
        self.seq_ids = []


# ---- the fused attention function ------------------------------------------------

def oscar_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            **kwargs):
    """transformers AttentionInterface function: decode attention with
    ``oscar_attention`` over the OScaR cache. ``query``: [B, Hq, T, d];
    returns ([B, T, Hq, d], None)."""
    ctx = getattr(key, "_oscar_ctx", None)
    if ctx is None:  # not fed by an OscarHFCache in fused mode: plain SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    owner, layer, before = ctx
    B, Hq, T, d = query.shape
    if T > MAX_Q_LEN:
        if before != 0:
            raise InvalidArgumentError("fused OScaR attention: %d new tokens on a non-empty cache "
                                       "(at most %d)" % (T, MAX_Q_LEN))
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, None, scaling=scaling,
                                      dropout=dropout, is_causal=True, **kwargs)
    q = query.transpose(1, 2).contiguous()  # [B, T, Hq, d]
    out = torch.empty_like(q)
    owner.oscar.attention(layer, owner.seq_ids, q, out=out, q_len=T,
                          softmax_scale=scaling if scaling else None)
    return out, None


def register_attention(name: str = ATTN_IMPLEMENTATION) -> str:
    """Registers :func:`oscar_attention_forward` in transformers' AttentionInterface
    under ``name`` (default "oscar"); returns the name."""
    from transformers import AttentionInterface
    AttentionInterface.register(name, oscar_attention_forward)
    return name


register_attention()

# The name the issue uses: `from oscar.hf import OscarCache` (the HF drop-in;
# not to be confused with oscar.OscarCache, the paged pool it wraps).
OscarCache = OscarHFCache
