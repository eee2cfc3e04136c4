#!/usr/bin/env python3
"""Checks the C runner (`oscar ppl` / `oscar run`) against an independent
numpy implementation of the same GGUF model.

The reference reads the file with the PyPI `gguf` package (GGUFReader and
gguf.quants.dequantize, not our C reader), undoes llama.cpp's Q/K row
permutation (Llama; Qwen3 files are not permuted) and applies RoPE the
Hugging Face way (rotate_half on the original layout), so it does not share
the runner's RoPE convention. Qwen3 adds the per-head q/k RMSNorm and a head
dimension from attention.key_length. Gemma 3 (gemma3) adds, following Hugging
Face's Gemma3 model: embeddings times sqrt(dim), an RMSNorm after attention
and after the FFN, GELU (tanh) gating, and sliding-window layers (every layer
but each sixth) with a causal window of attention.sliding_window positions and
RoPE base 10000. It runs in float64 (the tied output matrix in float32
storage, products in float64).

Checks:
  1. logits of the first N tokens of a text, 16-bit oscar cache (--kv none)
     and the runner's fp32 cache (--kv f32): max |diff| / max |ref| <= 1e-2;
  2. greedy continuation of a prompt: identical token ids;
  3. tokenizer: round trip decode(encode(text)) == text with our own byte
     decoder, a few hand-checked ids, and, when the `tokenizers` package is
     installed, token-for-token equality with a Hugging Face BPE built from
     the same vocabulary and merges (digits split, byte-level GPT-2 regex).
     SentencePiece vocabularies (Gemma): the round trip, hand-checked ids, and,
     when `transformers` is installed, equality with the tokenizer it builds
     from the same GGUF (AutoTokenizer.from_pretrained(..., gguf_file=...)).

Exit 0 on success, 1 on failure, 77 (skip) when numpy or gguf is missing.
"""
import argparse
import os
import subprocess
import sys
import tempfile

try:
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
except ImportError as e:  # pragma: no cover
    print(f"SKIP: check_logits.py needs numpy and gguf (pip install numpy gguf): {e}")
    sys.exit(77)


def field(r, key):
    f = r.fields[key]
    return f.contents()


class Ref:
    def __init__(self, path):
        r = GGUFReader(path)
        self.r = r
        arch = field(r, "general.architecture")
        self.arch = arch
        g = lambda k, d=None: field(r, f"{arch}.{k}") if f"{arch}.{k}" in r.fields else d
        self.n_layers = int(g("block_count"))
        self.dim = int(g("embedding_length"))
        self.n_heads = int(g("attention.head_count"))
        self.n_kv = int(g("attention.head_count_kv", self.n_heads))
        self.hd = int(g("attention.key_length", self.dim // self.n_heads))
        self.eps = float(g("attention.layer_norm_rms_epsilon"))
        self.base = float(g("rope.freq_base", 10000.0))
        self.t = {t.name: t for t in r.tensors}
        self.cache = {}
        self.gemma = arch == "gemma3"
        if self.gemma:  # as llama.cpp reads a gemma3 file: the pattern and local base are not stored
            self.window = int(g("attention.sliding_window"))
            self.base_local = float(g("rope.freq_base_swa", 10000.0))
            self.local = [(l + 1) % 6 != 0 for l in range(self.n_layers)]
        else:
            self.local = [False] * self.n_layers
        tk = "tokenizer.ggml.add_bos_token"
        self.add_bos = bool(field(r, tk)) if tk in r.fields else False
        self.bos = int(field(r, "tokenizer.ggml.bos_token_id")) if "tokenizer.ggml.bos_token_id" in r.fields else None

    def w(self, name, dtype=np.float64):
        if name not in self.cache:
            t = self.t[name]
            a = dequantize(t.data, t.tensor_type).astype(dtype)
            rows = int(t.shape[1]) if len(t.shape) > 1 else 1
            self.cache[name] = a.reshape(rows, int(t.shape[0])) if len(t.shape) > 1 else a.reshape(-1)
        return self.cache[name]

    @staticmethod
    def unpermute(w, n_head):
        # llama.cpp's converter permuted HF rows as
        #   w.reshape(n_head, 2, hd//2, cols).swapaxes(1, 2); undo it
        rows, cols = w.shape
        return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)

    def rms(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def rope_hf(self, x, pos, base=None):  # x: [T, H, hd], HF rotate_half layout
        hd = x.shape[-1]
        inv = (base or self.base) ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
        ang = np.outer(pos, inv)  # [T, hd/2]
        cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
        sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        rot = np.concatenate([-x2, x1], -1)
        return x * cos + rot * sin

    def forward(self, ids, all_logits=True):
        T = len(ids)
        emb = self.w("token_embd.weight", np.float32)  # float32 storage: Gemma's is 262144 x 640
        x = emb[np.asarray(ids)].astype(np.float64)
        if self.gemma:
            x = x * np.sqrt(self.dim)
        pos = np.arange(T, dtype=np.float64)
        mask = np.triu(np.full((T, T), -np.inf), 1)
        if self.gemma:  # query i sees keys j with i - window < j <= i
            local_mask = mask + np.tril(np.full((T, T), -np.inf), -self.window)
        g = self.n_heads // self.n_kv
        for l in range(self.n_layers):
            p = f"blk.{l}."
            h = self.rms(x, self.w(p + "attn_norm.weight"))
            wq, wk = self.w(p + "attn_q.weight"), self.w(p + "attn_k.weight")
            if self.arch == "llama":
                wq, wk = self.unpermute(wq, self.n_heads), self.unpermute(wk, self.n_kv)
            q = (h @ wq.T).reshape(T, self.n_heads, self.hd)
            k = (h @ wk.T).reshape(T, self.n_kv, self.hd)
            v = (h @ self.w(p + "attn_v.weight").T).reshape(T, self.n_kv, self.hd)
            if self.arch in ("qwen3", "gemma3"):  # RMSNorm of each head's q and k
                q = self.rms(q, self.w(p + "attn_q_norm.weight"))
                k = self.rms(k, self.w(p + "attn_k_norm.weight"))
            base = self.base_local if self.local[l] else self.base
            q, k = self.rope_hf(q, pos, base), self.rope_hf(k, pos, base)
            out = np.empty((T, self.n_heads, self.hd))
            m_l = local_mask if self.local[l] else mask
            for hh in range(self.n_heads):
                # Gemma 3: query_pre_attn_scalar = head_dim (all sizes but 27B)
                s = q[:, hh] @ k[:, hh // g].T / np.sqrt(self.hd) + m_l
                s = np.exp(s - s.max(-1, keepdims=True))
                s /= s.sum(-1, keepdims=True)
                out[:, hh] = s @ v[:, hh // g]
            o = out.reshape(T, -1) @ self.w(p + "attn_output.weight").T
            if self.gemma:  # the file's norm weights already hold Gemma's 1 + w
                o = self.rms(o, self.w(p + "post_attention_norm.weight"))
            x = x + o
            h = self.rms(x, self.w(p + "ffn_norm.weight"))
            a = h @ self.w(p + "ffn_gate.weight").T
            b = h @ self.w(p + "ffn_up.weight").T
            if self.gemma:  # gelu_pytorch_tanh
                act = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a ** 3)))
            else:
                act = a / (1 + np.exp(-a))
            o = (act * b) @ self.w(p + "ffn_down.weight").T
            if self.gemma:
                o = self.rms(o, self.w(p + "post_ffw_norm.weight"))
            x = x + o
        x = self.rms(x if all_logits else x[-1:], self.w("output_norm.weight"))
        out_w = self.w("output.weight", np.float32) if "output.weight" in self.t else emb
        step = 16384  # float64 products of float32 rows, a slice of the vocabulary at a time
        return np.concatenate([x @ out_w[i:i + step].astype(np.float64).T for i in range(0, len(out_w), step)], -1)


def byte_decoder():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def run_tokens(a, text, td, name):
    """The ids `oscar ppl --dump` writes for text (no BOS: the dump holds the text's own tokens)."""
    tp = os.path.join(td, name + ".txt")
    with open(tp, "w", encoding="utf-8") as f:
        f.write(text)
    subprocess.run([a.oscar, "ppl", "--model", a.model, "--text", tp, "--ctx", "2", "--windows", "1",
                    "--kv", "f32", "--dump", os.path.join(td, name)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [int(i) for i in np.fromfile(os.path.join(td, name + ".tokens"), dtype=np.int32)]


def check_gpt2_tokenizer(a, ref, vocab, ids, text, td):
    ok = True
    dec = byte_decoder()
    back = bytearray()
    for i in ids:
        back += bytes(dec[c] for c in vocab[i])
    rt = back.decode("utf-8", errors="replace") == open(a.text, "rb").read().decode("utf-8", errors="replace")
    print(f"tokenizer: {len(ids)} tokens; round trip decode(encode(text)) == text: {rt}")
    ok &= rt
    hf = None
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers, decoders
        merges = [tuple(m.split(" ", 1)) for m in field(ref.r, "tokenizer.ggml.merges")]
        hf = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, merges))
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        hf.decoder = decoders.ByteLevel()
        hf_ids = hf.encode(text).ids
        same = list(hf_ids) == [int(i) for i in ids]
        if not same:
            first = next((j for j, (x, y) in enumerate(zip(hf_ids, ids)) if x != y), min(len(hf_ids), len(ids)))
            print(f"tokenizer: DIFFERS from Hugging Face tokenizers at token {first}: "
                  f"ours {list(ids[first:first+8])} hf {hf_ids[first:first+8]}")
        else:
            print(f"tokenizer: identical to Hugging Face tokenizers {__import__('tokenizers').__version__} "
                  f"on all {len(ids)} tokens")
        ok &= same
    except ImportError:
        print("tokenizer: `tokenizers` not installed; HF comparison skipped")

    # tricky strings: digits, contractions, whitespace runs, non-ASCII letters and numbers
    tricky = ("It's 2024: 12345 apples, don't... I'll  we've   spaces\n\n\ttabs\r\n"
              "ünïcödé naïve café 日本語のテキスト Ⅻ ½ ٣ 🎉 'quoted' \"dq\" x=1+2; CamelCase snake_case "
              "3.14159 $100 a\u00a0b\u2003c   \n  end")
    tp = os.path.join(td, "tricky.txt")
    with open(tp, "w", encoding="utf-8") as f:
        f.write(tricky)
    subprocess.run([a.oscar, "ppl", "--model", a.model, "--text", tp, "--ctx", "2", "--windows", "1",
                    "--kv", "f32", "--dump", os.path.join(td, "tricky")], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tids = [int(i) for i in np.fromfile(os.path.join(td, "tricky.tokens"), dtype=np.int32)]
    tback = bytearray()
    for i in tids:
        tback += bytes(dec[c] for c in vocab[i])
    trt = tback.decode("utf-8") == tricky
    print(f"tokenizer: tricky string ({len(tids)} tokens) round trip: {trt}")
    ok &= trt
    if hf is not None:
        same = hf.encode(tricky).ids == tids
        print(f"tokenizer: tricky string identical to Hugging Face tokenizers: {same}")
        ok &= same
    # the model's own greedy answer "The capital of France is Paris." (ids seen in `oscar run`)
    hand = {"The capital of France is Paris.": [504, 3575, 282, 4649, 314, 7042, 30]}
    for s_, want_ids in hand.items():
        with open(tp, "w", encoding="utf-8") as f:
            f.write(s_)
        subprocess.run([a.oscar, "ppl", "--model", a.model, "--text", tp, "--ctx", "2", "--windows", "1",
                        "--kv", "f32", "--dump", os.path.join(td, "hand")], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        got_ids = [int(i) for i in np.fromfile(os.path.join(td, "hand.tokens"), dtype=np.int32)]
        print(f"tokenizer: {s_!r} -> {got_ids} ({'ok' if got_ids == want_ids else 'expected %s' % want_ids})")
        ok &= got_ids == want_ids

    return ok


def spm_decode(vocab, types, ids):
    out = bytearray()
    for i in ids:
        t = vocab[i]
        if types[i] == 6:  # <0xXX>
            out.append(int(t[3:5], 16))
        else:
            out += t.replace("\u2581", " ").encode("utf-8")
    return out.decode("utf-8", errors="replace")


def check_spm_tokenizer(a, ref, vocab, ids, text, td):
    """SentencePiece BPE (Gemma 3): round trips, hand-checked ids, and equality with the tokenizer
    transformers builds from the same GGUF."""
    ok = True
    types = [int(x) for x in field(ref.r, "tokenizer.ggml.token_type")]
    rt = spm_decode(vocab, types, ids) == text
    print(f"tokenizer: {len(ids)} tokens; round trip decode(encode(text)) == text: {rt}")
    ok &= rt
    tricky = ("It's 2024: 12345 apples, don't... I'll  we've   spaces\n\n\ttabs\r\n"
              "ünïcödé naïve café 日本語のテキスト Ⅻ ½ ٣ 🎉 'quoted' \"dq\" x=1+2; CamelCase snake_case "
              "3.14159 $100 a\u00a0b\u2003c   \n  end <b>bold</b> \U0001F9EC\U000E0001")
    tids = run_tokens(a, tricky, td, "tricky")
    trt = spm_decode(vocab, types, tids) == tricky
    print(f"tokenizer: tricky string ({len(tids)} tokens) round trip: {trt}")
    ok &= trt
    # ids from transformers' GemmaTokenizer on this GGUF (see below), checked by hand against the vocabulary
    hand = {"The capital of France is": [818, 5279, 529, 7001, 563],
            "  two  spaces\n\nnewline": [138, 13498, 138, 35220, 108, 73481]}
    for s_, want_ids in hand.items():
        got_ids = run_tokens(a, s_, td, "hand")
        print(f"tokenizer: {s_!r} -> {got_ids} ({'ok' if got_ids == want_ids else 'expected %s' % want_ids})")
        ok &= got_ids == want_ids
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as tlog
        tlog.set_verbosity_error()
        hf = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(a.model)),
                                           gguf_file=os.path.basename(a.model))
    except Exception as e:  # not installed, or too old to read this GGUF's tokenizer
        print(f"tokenizer: transformers could not build the GGUF's tokenizer ({type(e).__name__}); comparison skipped")
        return ok
    for name, s_, ours in (("text", text, [int(i) for i in ids]), ("tricky string", tricky, tids)):
        theirs = hf.encode(s_, add_special_tokens=False)
        same = theirs == ours
        if same:
            print(f"tokenizer: {name} identical to transformers {__import__('transformers').__version__} "
                  f"GemmaTokenizer from the GGUF on all {len(ours)} tokens")
        else:
            first = next((j for j, (x, y) in enumerate(zip(theirs, ours)) if x != y), min(len(theirs), len(ours)))
            print(f"tokenizer: {name} DIFFERS from transformers at token {first}: "
                  f"ours {ours[first:first+8]} transformers {theirs[first:first+8]}")
        ok &= same
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--oscar", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--gen", type=int, default=24)
    ap.add_argument("--tol", type=float, default=1e-2)
    ap.add_argument("--tokenizer-only", action="store_true", help="skip the (slower) logits and greedy checks")
    a = ap.parse_args()
    ok = True
    ref = Ref(a.model)
    vocab = field(ref.r, "tokenizer.ggml.tokens")
    with tempfile.TemporaryDirectory() as td:
        logits = {}
        for kv in (("f32",) if a.tokenizer_only else ("none", "f32")):
            pre = os.path.join(td, kv)
            cmd = [a.oscar, "ppl", "--model", a.model, "--text", a.text, "--ctx", str(a.tokens),
                   "--windows", "1", "--kv", kv, "--dump", pre]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            ids = np.fromfile(pre + ".tokens", dtype=np.int32)
            logits[kv] = np.fromfile(pre + ".logits", dtype=np.float32).reshape(a.tokens, -1)

        # -- tokenizer --------------------------------------------------------
        text = open(a.text, "rb").read().decode("utf-8", errors="replace")
        if field(ref.r, "tokenizer.ggml.model") == "llama":
            ok &= check_spm_tokenizer(a, ref, vocab, ids, text, td)
        else:
            ok &= check_gpt2_tokenizer(a, ref, vocab, ids, text, td)

        if a.tokenizer_only:
            print("PASS" if ok else "FAIL")
            return 0 if ok else 1

        # -- logits ------------------------------------------------------------
        ids_run = [int(i) for i in ids[: a.tokens]]
        if ref.add_bos and ref.bos is not None:  # oscar ppl puts BOS first in each window
            ids_run[0] = ref.bos
        want = ref.forward(ids_run)
        scale = np.abs(want).max()
        for kv, got in logits.items():
            err = np.abs(got.astype(np.float64) - want).max()
            per_tok = (np.abs(got - want).max(-1) / np.abs(want).max(-1)).max()
            agree = (got.argmax(-1) == want.argmax(-1)).mean()
            good = err / scale <= a.tol
            print(f"logits --kv {kv}: {a.tokens} tokens, max |diff| {err:.4g}, relative to max |logit| "
                  f"{err / scale:.3g} (worst token {per_tok:.3g}), argmax agreement {agree:.4f} -> "
                  f"{'ok' if good else 'FAIL'} (tolerance {a.tol})")
            ok &= bool(good)

        # -- greedy continuation -------------------------------------------------
        prompt = open(a.text, "rb").read()[:200].decode("utf-8", errors="ignore")
        out = subprocess.run([a.oscar, "run", "--model", a.model, "--prompt", prompt, "--raw", "--kv", "none",
                              "-n", str(a.gen), "--ids", "--ignore-eos"], check=True, capture_output=True,
                             encoding="utf-8", errors="replace").stdout  # a random model may print broken UTF-8
        pids = [int(x) for x in next(l for l in out.splitlines() if l.startswith("prompt_ids:")).split()[1:]]
        gids = [int(x) for x in next(l for l in out.splitlines() if l.startswith("ids:")).split()[1:]]
        seq = list(pids)
        for _ in range(a.gen):
            seq.append(int(ref.forward(seq, all_logits=False)[-1].argmax()))
        same = seq[len(pids):] == gids
        print(f"greedy: {a.gen} tokens after a {len(pids)}-token prompt: "
              f"{'identical' if same else 'DIFFERENT'}\n  runner: {gids}\n  numpy:  {seq[len(pids):]}")
        ok &= same
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
