"""Small random-weight transformers models and references for the oscar.hf tests.

No weights are downloaded: the models are built from a config with a fixed
seed. The reference is transformers' own DynamicCache with SDPA attention on a
twin model with the same weights, and FakeQuantCache: a DynamicCache whose
completed blocks are replaced by an independent fake quantisation written from
docs/FORMAT.md (in torch, not through the library).
"""

import copy
import inspect

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import oscar.hf

VOCAB = 1000


def make_pair(device, dtype=torch.float32, layers=2, seed=0, arch="llama", max_pos=8192):
    """(reference model with sdpa, oscar model with the same weights, config)."""
    oscar.hf.register()
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  max_position_embeddings=max_pos, rope_theta=10000.0)
    if arch == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM
        cfg, cls = Qwen3Config(**common, use_sliding_window=False), Qwen3ForCausalLM
    else:
        cfg, cls = LlamaConfig(**common), LlamaForCausalLM
    cfg._attn_implementation = "sdpa"
    ref = cls(copy.deepcopy(cfg))
    with torch.no_grad():   # larger q/k weights than the default init: peaky, non-trivial attention
        for name, p in ref.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    ref = ref.to(device=device, dtype=dtype).eval()
    ocfg = copy.deepcopy(cfg)
    ocfg._attn_implementation = "oscar"
    model = cls(ocfg).to(device=device, dtype=dtype).eval()
    model.load_state_dict(ref.state_dict())
    model.config._attn_implementation = "oscar"
    return ref, model, cfg


def cache_kwarg(model):
    """The forward's cache argument: `cache` (transformers >= 5.2x) or `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def generate(model, ids, cache, n, mask=None, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                              output_logits=True, **{cache_kwarg(model): cache}, **kw)


def forced_logits(model, tokens, cache, prompt_len, chunk=None):
    """Prefill tokens[:, :prompt_len] (in pieces of `chunk` tokens if given), then one
    token at a time (teacher forcing: both caches see the same inputs). [steps, B, V]."""
    out = []
    kw = {cache_kwarg(model): cache, "use_cache": True}
    with torch.no_grad():
        step = chunk or prompt_len
        for s in range(0, prompt_len, step):
            r = model(tokens[:, s:min(prompt_len, s + step)], **kw)
        out.append(r.logits[:, -1])
        for i in range(prompt_len, tokens.shape[1]):
            r = model(tokens[:, i:i + 1], **kw)
            out.append(r.logits[:, -1])
    return torch.stack(out)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def left_padded(lengths, device, seed=1):
    """Token ids [B, max] with left padding (id 0) and the matching 2-D mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[i, T - n:] = 1
    return ids.to(device), mask.to(device)


# ---- an independent fake-quant reference (docs/FORMAT.md numerics, in torch) ----------

def _hadamard_matrix(d, device):
    i = torch.arange(d)
    bits = torch.bitwise_and(i[:, None], i[None, :])
    pop = torch.zeros_like(bits)
    for b in range(12):
        pop += (bits >> b) & 1
    return ((1 - 2 * (pop % 2)).to(torch.float32) / d ** 0.5).to(device)


def _quant_groups(x, levels):
    """Asymmetric min-max over the last axis with fp16-stored (scale, lo)."""
    lo = x.amin(-1, keepdim=True)
    hi = x.amax(-1, keepdim=True)
    sc = ((hi - lo) / levels).half().float()
    l0 = lo.half().float()
    code = torch.where(sc > 0, torch.clamp(torch.round((x - l0) / sc), 0, levels), torch.zeros_like(x))
    return l0 + code * sc


def fake_quant_block(k, v, method, bits, gk=32, gv=32):
    """k, v: [B, H, R, d] float32 (one block). Returns dequantised (k, v) in the original space."""
    B, H, R, d = k.shape
    L = float(2 ** bits - 1)
    rot = method in ("quarot", "oscar")
    scl = method in ("scale-only", "oscar")
    Hm = _hadamard_matrix(d, k.device)
    kr = k @ Hm if rot else k
    vr = v @ Hm if rot else v
    s = torch.ones(B, 1, R, 1, device=k.device)
    if scl:
        s = kr.pow(2).sum(dim=(1, 3), keepdim=True).sqrt()
        s = torch.where((s > 0) & torch.isfinite(s), s, torch.ones_like(s))
    x = kr / s
    xg = x.reshape(B, H, R // gk, gk, d).transpose(-1, -2)
    kq = _quant_groups(xg, L).transpose(-1, -2).reshape(B, H, R, d) * s
    vq = _quant_groups(vr.reshape(B, H, R, d // gv, gv), L).reshape(B, H, R, d)
    if rot:
        kq, vq = kq @ Hm, vq @ Hm
    return kq, vq


class FakeQuantCache(DynamicCache):
    """DynamicCache whose full blocks of R tokens are replaced by fake-quantised values
    as soon as they are complete (before the forward that completed them attends),
    as the oscar pool packs them. Unpadded batches only."""

    def __init__(self, cfg, method, bits, R):
        super().__init__(config=cfg)
        self.method, self.bits, self.R = method, bits, R
        self.done = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        done = self.done.get(layer_idx, 0)
        full = k.shape[-2] // self.R * self.R
        for b0 in range(done, full, self.R):
            kq, vq = fake_quant_block(layer.keys[:, :, b0:b0 + self.R].float(),
                                      layer.values[:, :, b0:b0 + self.R].float(), self.method, self.bits,
                                      gk=min(32, self.R))
            layer.keys[:, :, b0:b0 + self.R] = kq.to(layer.keys.dtype)
            layer.values[:, :, b0:b0 + self.R] = vq.to(layer.values.dtype)
        self.done[layer_idx] = full
        return layer.keys, layer.values
