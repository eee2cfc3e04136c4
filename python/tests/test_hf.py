"""Hugging Face drop-in tests: a small randomly initialised Llama (no weights
downloaded) generating with OscarHFCache against DynamicCache.

Run on the GPU (CUDA backend) as the [gpu] variants and on the CPU as the
[cpu] variants; skipped with a message when torch/transformers (or a GPU) are
missing.  GPU only:  python3 -m pytest -q python/tests -k gpu
"""

import warnings

import pytest

from conftest import cuda_ready, import_or_skip

torch = import_or_skip("torch", "Hugging Face tests")
transformers = import_or_skip("transformers", "Hugging Face tests")

import oscar  # noqa: E402
from oscar.hf import OscarHFCache, register_attention  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

pytestmark = [pytest.mark.hf,
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="gpu", marks=pytest.mark.gpu)]


def _device(dev):
    if dev == "cuda":
        ok, why = cuda_ready()
        if not ok:
            pytest.skip("GPU test skipped: " + why)
    return torch.device(dev)


def make_model(device, dtype=torch.float32, attn="sdpa", seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=64, max_position_embeddings=1024, rope_theta=10000.0)
    cfg._attn_implementation = attn
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():   # larger weights than the default init: peaky, non-trivial attention
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    model = model.to(device=device, dtype=dtype).eval()
    model.config._attn_implementation = attn
    return model, cfg


def generate(model, ids, cache, n):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              past_key_values=cache, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0)


def forced_logits(model, tokens, cache, prompt_len):
    """Prefill tokens[:, :prompt_len], then decode the rest one token at a time
    (teacher forcing, so both caches see identical inputs). Returns [steps, B, V]."""
    out = []
    with torch.no_grad():
        r = model(tokens[:, :prompt_len], past_key_values=cache, use_cache=True)
        out.append(r.logits[:, -1])
        for i in range(prompt_len, tokens.shape[1]):
            r = model(tokens[:, i:i + 1], past_key_values=cache, use_cache=True)
            out.append(r.logits[:, -1])
    return torch.stack(out)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dev", DEVICES)
def test_hf_generate_exact_while_in_window(dev):
    device = _device(dev)
    model, cfg = make_model(device)
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(1)).to(device)
    ref = generate(model, ids, DynamicCache(config=cfg), 20)
    cache = OscarHFCache(cfg, window_dtype="f32", residual=64)   # 29 tokens < R: all in the window
    got = generate(model, ids, cache, 20)
    assert torch.equal(got.sequences, ref.sequences)
    assert len(got.logits) == len(ref.logits) == 20
    for a, b in zip(got.logits, ref.logits):
        assert torch.equal(a, b)
    info = cache.oscar.info(cache.seq_ids[0], cfg.num_hidden_layers - 1)
    assert info.tokens == 28 and info.packed_tokens == 0
    assert cache.oscar.backend == ("cuda" if dev == "cuda" else "cpu")
    assert cache.get_seq_length() == 28


@pytest.mark.parametrize("dev", DEVICES)
def test_hf_method_none_stays_exact_after_flush(dev):
    """With no quantisation and an f32 window, flushed blocks read back exactly:
    tests the flush/read plumbing of the drop-in bit for bit."""
    device = _device(dev)
    model, cfg = make_model(device)
    tokens = torch.randint(0, 1000, (1, 90), generator=torch.Generator().manual_seed(2)).to(device)
    ref = forced_logits(model, tokens, DynamicCache(config=cfg), 40)
    cache = OscarHFCache(cfg, method="none", window_dtype="f32", residual=32)
    got = forced_logits(model, tokens, cache, 40)
    assert cache.oscar.info(cache.seq_ids[0], 0).packed_tokens == 64
    assert torch.equal(got, ref)


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
    code = torch.where(sc > 0, torch.clamp(torch.round((x - l0) / sc), 0, levels),
                       torch.zeros_like(x))
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
    # keys: per (head, channel) over gk tokens
    xg = x.reshape(B, H, R // gk, gk, d).transpose(-1, -2)
    kq = _quant_groups(xg, L).transpose(-1, -2).reshape(B, H, R, d) * s
    vq = _quant_groups(vr.reshape(B, H, R, d // gv, gv), L).reshape(B, H, R, d)
    if rot:
        kq, vq = kq @ Hm, vq @ Hm
    return kq, vq


class FakeQuantCache(DynamicCache):
    """DynamicCache whose full blocks of R tokens are replaced by fake-quantised values."""

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
                                      layer.values[:, :, b0:b0 + self.R].float(),
                                      self.method, self.bits)
            layer.keys[:, :, b0:b0 + self.R] = kq.to(layer.keys.dtype)
            layer.values[:, :, b0:b0 + self.R] = vq.to(layer.values.dtype)
        self.done[layer_idx] = full
        return layer.keys, layer.values


@pytest.mark.parametrize("dev", DEVICES)
def test_hf_close_after_quantisation(dev):
    """After the first flush the logits leave DynamicCache's by exactly the
    quantisation error: they match an independent fake-quant reference of the
    documented numerics (bit for bit for KIVI, to float rounding of the
    Hadamard transform for OScaR), and stay within a bound of the fp32 logits."""
    device = _device(dev)
    model, cfg = make_model(device)
    tokens = torch.randint(0, 1000, (2, 100), generator=torch.Generator().manual_seed(3)).to(device)
    ref = forced_logits(model, tokens, DynamicCache(config=cfg), 48)
    errs = {}
    for method, bits in (("kivi", 2), ("oscar", 2), ("oscar", 4)):
        cache = OscarHFCache(cfg, method=method, bits=bits, window_dtype="f32", residual=32)
        got = forced_logits(model, tokens, cache, 48)
        info = cache.oscar.info(cache.seq_ids[1], 1)
        assert info.packed_tokens == 96 and info.window_tokens == 4
        assert torch.isfinite(got).all()
        fq = forced_logits(model, tokens, FakeQuantCache(cfg, method, bits, 32), 48)
        assert torch.equal(got[0], ref[0]) is False   # 32 prompt tokens were already quantised
        e_fq, e_ref = rel_err(got, fq), rel_err(got, ref)
        errs[(method, bits)] = (e_fq, e_ref)
        if method == "kivi" and dev == "cpu":   # same fp32 formula, no transform: bit for bit
            assert e_fq < 1e-5, errs
        else:
            assert e_fq < 0.1 * e_ref, errs
    assert errs[("oscar", 4)][1] < errs[("oscar", 2)][1] < 1.0, errs


@pytest.mark.parametrize("dev", DEVICES)
def test_hf_generate_runs_with_2bit_cache_bf16(dev):
    device = _device(dev)
    dtype = torch.bfloat16
    model, cfg = make_model(device, dtype=dtype)
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(4)).to(device)
    cache = OscarHFCache(cfg, residual=32)
    out = generate(model, ids, cache, 30)
    assert out.sequences.shape == (1, 70)
    m = cache.memory()
    assert m.blocks_used == 2 and m.compression_vs_fp16 > 4
    assert cache.oscar.config.window_dtype == {torch.float32: "f32", torch.bfloat16: "bf16"}[dtype]


@pytest.mark.parametrize("dev", DEVICES)
def test_hf_beam_search_forks(dev):
    device = _device(dev)
    model, cfg = make_model(device)
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(5)).to(device)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=10, num_beams=3, do_sample=False,
                             past_key_values=DynamicCache(config=cfg), pad_token_id=0)
        cache = OscarHFCache(cfg, window_dtype="f32", residual=64)
        got = model.generate(ids, max_new_tokens=10, num_beams=3, do_sample=False,
                             past_key_values=cache, pad_token_id=0)
    assert torch.equal(got, ref)
    assert cache.oscar.memory().seqs_live == 3


@pytest.mark.parametrize("dev", DEVICES)
def test_hf_fused_attention(dev):
    """attn_implementation="oscar": attention runs in oscar_attention, no K/V copy kept."""
    device = _device(dev)
    register_attention()
    model, cfg = make_model(device)
    fused, _ = make_model(device, attn="oscar")
    tokens = torch.randint(0, 1000, (1, 80), generator=torch.Generator().manual_seed(6)).to(device)
    ref = forced_logits(model, tokens, DynamicCache(config=cfg), 20)
    # everything in the window (R=128): equal to DynamicCache up to float rounding
    cache = OscarHFCache(cfg, window_dtype="f32", residual=128, attention="fused")
    got = forced_logits(fused, tokens, cache, 20)
    assert cache.layers[0].keys is None or cache.layers[0].keys.numel() == 0
    tight = 1e-4 if dev == "cpu" else 1e-2    # GPU kernels may use 16-bit MMA operands
    assert rel_err(got, ref) < tight
    # quantised: the same error as the dequantising drop-in, which attends over the same values
    c1 = OscarHFCache(cfg, window_dtype="f32", residual=32, attention="fused")
    c2 = OscarHFCache(cfg, window_dtype="f32", residual=32)
    g1 = forced_logits(fused, tokens, c1, 20)
    g2 = forced_logits(model, tokens, c2, 20)
    assert c1.oscar.info(c1.seq_ids[0], 0).packed_tokens == 64
    assert rel_err(g1, g2) < 10 * tight
    assert 0 < rel_err(g1, ref) < 1.0
