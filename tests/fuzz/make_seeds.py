#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz harnesses (tests/fuzz/*/seeds).

No dependencies beyond the standard library: the GGUF file is written byte
by byte from the GGUF v3 layout, the .npy files from the NumPy format spec.
The import harness's seeds (valid export streams) come from the library
itself: tests/fuzz/gen_import_seeds.c (see tests/fuzz/README.md).

usage: make_seeds.py [OUT_DIR]   (default: the directory of this script)
"""
import os
import struct
import sys

# ---- GGUF ------------------------------------------------------------------

T_U32, T_F32, T_BOOL, T_STR, T_ARR, T_I32 = 4, 6, 7, 8, 9, 5
GGML_F32, GGML_F16 = 0, 1


def gstr(s):
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, value, arr_type=None):
    out = gstr(key) + struct.pack("<I", vtype)
    if vtype == T_U32:
        out += struct.pack("<I", value)
    elif vtype == T_F32:
        out += struct.pack("<f", value)
    elif vtype == T_BOOL:
        out += struct.pack("<B", value)
    elif vtype == T_STR:
        out += gstr(value)
    elif vtype == T_ARR:
        out += struct.pack("<IQ", arr_type, len(value))
        for v in value:
            out += gstr(v) if arr_type == T_STR else struct.pack("<i", v)
    return out


def byte_alphabet():
    """GPT-2's printable stand-in for each byte (tokenizer.c, tok_load)."""
    cps, shift = [], 0
    for b in range(256):
        printable = 33 <= b <= 126 or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF
        cps.append(b if printable else 256 + shift)
        if not printable:
            shift += 1
    return [chr(c) for c in cps]


def tiny_llama(n_layers=1, dim=8, heads=2, kv_heads=1, ffn=16, f16_embed=True, extra=()):
    alpha = byte_alphabet()
    sp = alpha[ord(" ")]
    merges = [("t", "h"), ("th", "e"), (sp, "t"), (sp + "t", "h"), (sp + "th", "e"), ("i", "n"), ("e", "r"), ("o", "s"),
              ("os", "c"), ("osc", "a"), ("osca", "r"), ("1", "2")]
    tokens = list(alpha)
    for a, b in merges:
        tokens.append(a + b)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * len(tokens) + [3] * len(specials)
    tokens += specials
    vocab = len(tokens)
    head_dim = dim // heads
    meta = [
        ("general.architecture", T_STR, "llama"),
        ("general.name", T_STR, "oscar fuzz seed"),
        ("general.alignment", T_U32, 32),
        ("llama.block_count", T_U32, n_layers),
        ("llama.context_length", T_U32, 256),
        ("llama.embedding_length", T_U32, dim),
        ("llama.feed_forward_length", T_U32, ffn),
        ("llama.attention.head_count", T_U32, heads),
        ("llama.attention.head_count_kv", T_U32, kv_heads),
        ("llama.rope.freq_base", T_F32, 10000.0),
        ("llama.attention.layer_norm_rms_epsilon", T_F32, 1e-5),
        ("tokenizer.ggml.model", T_STR, "gpt2"),
        ("tokenizer.ggml.pre", T_STR, "smollm"),
        ("tokenizer.ggml.tokens", T_ARR, tokens, T_STR),
        ("tokenizer.ggml.token_type", T_ARR, types, T_I32),
        ("tokenizer.ggml.merges", T_ARR, [a + " " + b for a, b in merges], T_STR),
        ("tokenizer.ggml.bos_token_id", T_U32, vocab - 2),
        ("tokenizer.ggml.eos_token_id", T_U32, vocab - 1),
        ("tokenizer.ggml.add_bos_token", T_BOOL, 0),
        ("tokenizer.chat_template", T_STR,
           "{% for m in messages %}<|im_start|>{{m.role}}\n{{m.content}}<|im_end|>\n{% endfor %}"),
    ]
    # overrides replace a key in place (a duplicate key would be another test)
    override = {e[0]: e for e in extra}
    kvs = [kv(*override.get(m[0], m)) for m in meta]
    kvs += [kv(*e) for e in extra if e[0] not in {m[0] for m in meta}]
    tensors = [("token_embd.weight", [dim, vocab], GGML_F16 if f16_embed else GGML_F32),
               ("output_norm.weight", [dim], GGML_F32)]
    for l in range(n_layers):
        p = "blk.%d." % l
        tensors += [(p + "attn_norm.weight", [dim], GGML_F32), (p + "ffn_norm.weight", [dim], GGML_F32),
                    (p + "attn_q.weight", [dim, heads * head_dim], GGML_F32),
                    (p + "attn_k.weight", [dim, kv_heads * head_dim], GGML_F32),
                    (p + "attn_v.weight", [dim, kv_heads * head_dim], GGML_F32),
                    (p + "attn_output.weight", [heads * head_dim, dim], GGML_F32),
                    (p + "ffn_gate.weight", [dim, ffn], GGML_F32), (p + "ffn_up.weight", [dim, ffn], GGML_F32),
                    (p + "ffn_down.weight", [ffn, dim], GGML_F32)]
    infos, data = b"", b""
    for i, (name, ne, typ) in enumerate(tensors):
        n = 1
        for e in ne:
            n *= e
        infos += gstr(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", e) for e in ne)
        infos += struct.pack("<IQ", typ, len(data))
        # small deterministic weights; norms are 1
        vals = [1.0] * n if "norm" in name else [((i * 7 + j * 13) % 17 - 8) / 32.0 for j in range(n)]
        fmt = "<%de" % n if typ == GGML_F16 else "<%df" % n
        data += struct.pack(fmt, *vals)
        data += b"\0" * (-len(data) % 32)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs) + infos
    head += b"\0" * (-len(head) % 32)
    return head + data


# ---- .npy -------------------------------------------------------------------

def npy(shape, version=1, descr="<f4", fortran=False):
    n = 1
    for s in shape:
        n *= s
    shp = "(" + "".join("%d, " % s for s in shape) + ")" if len(shape) != 1 else "(%d,)" % shape[0]
    hdr = "{'descr': '%s', 'fortran_order': %s, 'shape': %s, }" % (descr, "True" if fortran else "False", shp)
    pre = 10 if version == 1 else 12
    hdr += " " * (-(pre + len(hdr) + 1) % 64) + "\n"
    out = b"\x93NUMPY" + bytes([version, 0])
    out += struct.pack("<H", len(hdr)) if version == 1 else struct.pack("<I", len(hdr))
    return out + hdr.encode("latin1") + struct.pack("<%df" % n, *[(i % 9) - 4.5 for i in range(n)])


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    write(os.path.join(out, "gguf/seeds/tiny-llama.gguf"), tiny_llama())
    write(os.path.join(out, "gguf/seeds/tiny-llama-2layers-f32.gguf"), tiny_llama(2, 8, 2, 2, 8, False))
    # the tokenizer harness loads this vocabulary (every byte, merges, control tokens)
    write(os.path.join(out, "tokenizer/tokenizer.gguf"), tiny_llama())
    texts = {
        "ascii.txt": b"the oscar 12 theirs in there, 2024-11-30!\n\tThe end.",
        "utf8.txt": "na\u00efve caf\u00e9 \u4e2d\u6587 \u0627\u0644\u0639\u0631\u0628\u064a\u0629 \U0001f600 \u0661\u0662".encode(),
        "invalid.txt": b"\xff\xfe\xc0\xaf \xed\xa0\x80 \xf4\x90\x80\x80 \xe2\x82 ok",
        "special.txt": b"<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<|endoftext|>",
        "spaces.txt": b"   \n\n  a  \r\n\x00\x01 x\u3000".replace(b"\\u3000", "\u3000".encode()),
        "digits.txt": b"1234567890 3.14159 \xd9\xa1\xd9\xa2\xd9\xa3",
    }
    for name, t in texts.items():
        # first byte: options (bit 0: parse_special)
        write(os.path.join(out, "tokenizer/seeds", name), bytes([1 if "special" in name else 0]) + t)
    # model metadata llama_load once took unchecked (tests/fuzz/README.md)
    regress = os.path.join(out, "gguf/regressions")
    write(os.path.join(regress, "rope-dimension-zero.gguf"), tiny_llama(extra=[("llama.rope.dimension_count", T_U32, 0)]))
    write(os.path.join(regress, "rope-dimension-negative.gguf"),
          tiny_llama(extra=[("llama.rope.dimension_count", T_U32, 0xFFFFFFFE)]))
    write(os.path.join(regress, "context-length-zero.gguf"), tiny_llama(extra=[("llama.context_length", T_U32, 0)]))
    write(os.path.join(regress, "rms-epsilon-nan.gguf"),
          tiny_llama(extra=[("llama.attention.layer_norm_rms_epsilon", T_F32, float("nan"))]))
    write(os.path.join(out, "npy/seeds/vector.npy"), npy([7]))
    write(os.path.join(out, "npy/seeds/matrix-v2.npy"), npy([3, 5], version=2))
    write(os.path.join(out, "npy/seeds/kv-4d.npy"), npy([2, 3, 2, 4]))
    write(os.path.join(out, "npy/seeds/empty.npy"), npy([0, 4]))
    write(os.path.join(out, "npy/seeds/scalar.npy"), npy([]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
