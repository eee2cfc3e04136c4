#!/usr/bin/env python3
"""Writes a small Qwen3-architecture GGUF with random weights, for tests.

No Qwen3 GGUF is published on a package registry we install from (PyPI,
Debian), so the runner's Qwen3 code path (per-head q/k RMSNorm, RoPE on the
(i, i + d/2) pairs, a head dimension other than dim / heads, tied or untied
output) is checked on a model of the right architecture with random weights,
against the numpy reference in tests/model/check_logits.py and between the
CPU and GPU runners. The tokenizer (vocabulary, merges, special tokens) is
copied from a real GGUF, so that text goes through the real tokenizer.

The weights are seeded (the same file every time) and scaled so that
activations stay O(1) and the logits have a clear top-1 (greedy decoding
then does not hinge on float rounding).

usage: make-qwen3-gguf.py TOKENIZER_SOURCE.gguf OUT.gguf [--layers N] [--untied] [--seed S]
"""
import argparse
import sys

import gguf
import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tokenizer_source")
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--untied", action="store_true", help="write output.weight (default: tied to the embedding)")
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args()

    src = gguf.GGUFReader(a.tokenizer_source)
    arch = "qwen3"
    w = gguf.GGUFWriter(a.out, arch)
    for name, f in src.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            if f.types[-1] == gguf.GGUFValueType.STRING:
                vals = [bytes(f.parts[i]).decode("utf-8", "surrogateescape") for i in f.data]
            else:
                vals = [f.parts[i].tolist()[0] for i in f.data]
            w.add_array(name, vals)
        elif vt == gguf.GGUFValueType.STRING:
            w.add_string(name, bytes(f.parts[-1]).decode("utf-8", "surrogateescape"))
        else:
            w.add_key_value(name, f.parts[-1].tolist()[0], vt)
    vocab = len(src.fields["tokenizer.ggml.tokens"].data)

    d, hd, H, Hkv, F = a.dim, a.head_dim, a.heads, a.kv_heads, a.ffn
    w.add_string("general.name", "random-qwen3-test")
    w.add_uint32(f"{arch}.block_count", a.layers)
    w.add_uint32(f"{arch}.context_length", 8192)
    w.add_uint32(f"{arch}.embedding_length", d)
    w.add_uint32(f"{arch}.feed_forward_length", F)
    w.add_uint32(f"{arch}.attention.head_count", H)
    w.add_uint32(f"{arch}.attention.head_count_kv", Hkv)
    w.add_uint32(f"{arch}.attention.key_length", hd)
    w.add_uint32(f"{arch}.attention.value_length", hd)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{arch}.rope.freq_base", 1000000.0)

    rng = np.random.default_rng(a.seed)

    def mat(rows, cols, scale=1.0):  # [rows][cols], fp16 in the file
        return (rng.standard_normal((rows, cols)) * scale / np.sqrt(cols)).astype(np.float16)

    def norm(n):  # positive, around 1, not all equal (a wrong index shows)
        return (1.0 + 0.5 * rng.uniform(-1, 1, n)).astype(np.float32)

    # Embedding rows of RMS 0.5: the final logits x_norm . e have a spread of
    # about 8, so the greedy top-1 is clear.
    w.add_tensor("token_embd.weight", (rng.standard_normal((vocab, d)) * 0.5).astype(np.float16))
    w.add_tensor("output_norm.weight", norm(d))
    if a.untied:
        w.add_tensor("output.weight", (rng.standard_normal((vocab, d)) * 0.5).astype(np.float16))
    for l in range(a.layers):
        p = f"blk.{l}."
        w.add_tensor(p + "attn_norm.weight", norm(d))
        w.add_tensor(p + "attn_q.weight", mat(H * hd, d, 2.0))
        w.add_tensor(p + "attn_k.weight", mat(Hkv * hd, d, 2.0))
        w.add_tensor(p + "attn_v.weight", mat(Hkv * hd, d))
        w.add_tensor(p + "attn_q_norm.weight", norm(hd))
        w.add_tensor(p + "attn_k_norm.weight", norm(hd))
        w.add_tensor(p + "attn_output.weight", mat(d, H * hd))
        w.add_tensor(p + "ffn_norm.weight", norm(d))
        w.add_tensor(p + "ffn_gate.weight", mat(F, d))
        w.add_tensor(p + "ffn_up.weight", mat(F, d))
        w.add_tensor(p + "ffn_down.weight", mat(d, F))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
