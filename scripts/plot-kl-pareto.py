#!/usr/bin/env python3
"""KL divergence against bits per element: oscar's caches and llama.cpp's.

Inputs: the JSON lines of `oscar ppl --score-second-half --json` (one per
cache; scripts/gpu-full-model.sh writes them as kl.jsonl) and the logs of
scripts/kl-llamacpp.sh (one per cache type, llama-perplexity's KLD summary).
Both score the same tokens of the same text with the same GGUF.

Bits per element count what a cache holds during a decode of --ctx tokens:
oscar's packed blocks plus its exact window, which holds (R - 1) / 2 tokens
on average at 16 bits; llama.cpp's block formats have no window (f16 16,
q8_0 8.5, q5_0 5.5, q4_1 5.0, q4_0 4.5 bits).

usage: plot-kl-pareto.py OSCAR_KL.jsonl LLAMA_DIR OUT.png [--ctx 4096]
Prints the table it plots (markdown) on stdout.
"""
import argparse
import json
import os
import re
import sys

LLAMA_BITS = {"q8_0": 8.5, "q5_0": 5.5, "q4_1": 5.0, "q4_0": 4.5}


def llama_kld(path):
    """Mean KLD, 99th percentile and 'same top p' from a llama-perplexity log."""
    text = open(path, errors="replace").read()
    num = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
    mean = re.search(r"Mean\s+KLD:\s+" + num, text)
    p99 = re.search(r"99\.0%\s+KLD:\s+" + num, text)
    top = re.search(r"Same top p:\s+" + num, text)
    ppl = re.search(r"Mean PPL\(Q\)\s*:\s+" + num, text)
    ppl_base = re.search(r"Mean PPL\(base\)\s*:\s+" + num, text)
    if not mean:
        return None
    nan = float("nan")
    return {"kl_mean": float(mean.group(1)), "kl_p99": float(p99.group(1)) if p99 else nan,
            "top1": float(top.group(1)) / 100 if top else nan,
            "dppl": 100 * (float(ppl.group(1)) / float(ppl_base.group(1)) - 1) if ppl and ppl_base else nan}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("oscar_jsonl")
    ap.add_argument("llama_dir")
    ap.add_argument("out_png")
    ap.add_argument("--ctx", type=int, default=4096)
    a = ap.parse_args()
    rows = []
    for line in open(a.oscar_jsonl):
        line = line.strip()
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        if r["method"] == "none":
            continue
        b = r["bits_per_element"]
        win = (r["residual"] - 1) / 2
        eff = b + (16 - b) * win / a.ctx
        rows.append(("oscar", "%s-%d" % (r["method"], r["bits"]), eff, r["kl_mean"], r["kl_p99"], r["top1_agree"],
                     r["delta_ppl_pct"]))
    for t, bits in LLAMA_BITS.items():
        p = os.path.join(a.llama_dir, t + ".log")
        if not os.path.exists(p):
            continue
        k = llama_kld(p)
        if k is None:
            print(f"{p}: no KLD summary", file=sys.stderr)
            continue
        rows.append(("llama.cpp", t, bits, k["kl_mean"], k["kl_p99"], k["top1"], k["dppl"]))
    print("| runner | cache | bits/element (window included) | mean KL | KL p99 | top-1 agreement | ΔPPL |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for who, name, bits, kl, p99, top, dppl in sorted(rows, key=lambda r: r[2]):
        print(f"| {who} | {name} | {bits:.2f} | {kl:.4f} | {p99:.3f} | {top:.3f} | {dppl:+.2f}% |")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: table only", file=sys.stderr)
        return 0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for who, marker, color in (("oscar", "o", "tab:blue"), ("llama.cpp", "s", "tab:red")):
        pts = [r for r in rows if r[0] == who]
        ax.scatter([r[2] for r in pts], [r[3] for r in pts], marker=marker, color=color, label=who, zorder=3)
        for r in pts:
            ax.annotate(r[1], (r[2], r[3]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("linear")
    ax.set_yscale("log")
    ax.set_xlabel("bits per K/V element (exact window included, %d-token context)" % a.ctx)
    ax.set_ylabel("mean KL(16-bit || cache), nats per token")
    ax.set_title("SmolLM2-135M, same text and scored tokens (llama-perplexity's)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out_png, dpi=110)
    print(f"wrote {a.out_png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
