#!/usr/bin/env python3
"""BF16 decode peers (torch SDPA with the cuDNN and flash backends), the
device-to-device copy bandwidth, and the combined tables.

    python3 peers.py OURS.jsonl OUT.md [PEERS.jsonl]

Shapes: Hq=32, Hkv=8, one query per sequence, head_dim 128 (and 64/256 for
the variants), BF16 K/V of the full context. GQA through enable_gqa=True.
Timing: median of 50 CUDA-event-timed calls after 10 warm-up calls, rotating
over several input sets when one set is smaller than 4x the L2.
The floor is our bytes / copy bandwidth (read + write counted), as in
shared/ANCHORS.md.
"""
import json
import math
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

dev = torch.device("cuda")
L2 = torch.cuda.get_device_properties(0).L2_cache_size if hasattr(torch.cuda.get_device_properties(0), "L2_cache_size") else 50 << 20


def time_fn(fns, warm=10, reps=50):
    s = torch.cuda.Event(enable_timing=True)
    e = torch.cuda.Event(enable_timing=True)
    ts = []
    for i in range(warm + reps):
        f = fns[i % len(fns)]
        s.record()
        f()
        e.record()
        e.synchronize()
        if i >= warm:
            ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def copy_bw():
    n = 1 << 30  # 2 GiB of bf16
    a = torch.empty(n, dtype=torch.bfloat16, device=dev).normal_()
    b = torch.empty_like(a)
    ms = time_fn([lambda: b.copy_(a)], warm=3, reps=20)
    bw = 2 * a.numel() * 2 / (ms * 1e-3)
    del a, b
    torch.cuda.empty_cache()
    return bw


def sdpa_peer(B, ctx, d, backend, hq=32, hkv=8):
    set_bytes = 2 * B * hkv * ctx * d * 2
    sets = max(1, math.ceil(4 * L2 / set_bytes))
    sets = min(sets, 64)
    data = []
    for _ in range(sets):
        q = torch.randn(B, hq, 1, d, dtype=torch.bfloat16, device=dev)
        k = torch.randn(B, hkv, ctx, d, dtype=torch.bfloat16, device=dev)
        v = torch.randn(B, hkv, ctx, d, dtype=torch.bfloat16, device=dev)
        data.append((q, k, v))

    def mk(q, k, v):
        def f():
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return f

    fns = [mk(*x) for x in data]
    try:
        ms = time_fn(fns)
    except Exception as ex:  # backend refused the shape
        print(f"  {backend} B={B} ctx={ctx} d={d}: {type(ex).__name__}: {str(ex)[:120]}", flush=True)
        ms = float("nan")
    del data, fns
    torch.cuda.empty_cache()
    return ms, set_bytes


def main():
    ours_path, md_path = sys.argv[1], sys.argv[2]
    peers_path = sys.argv[3] if len(sys.argv) > 3 else None
    ours = [json.loads(l) for l in open(ours_path) if l.strip().startswith("{")]
    torch.manual_seed(0)
    bw = copy_bw()
    print(f"copy bandwidth (read+write): {bw/1e12:.3f} TB/s", flush=True)
    peers = {}
    shapes = sorted({(o["B"], o["ctx"], o["d"]) for o in ours if o["kind"] == "decode"})
    for (B, ctx, d) in shapes:
        c_ms, nbytes = sdpa_peer(B, ctx, d, SDPBackend.CUDNN_ATTENTION)
        f_ms, _ = sdpa_peer(B, ctx, d, SDPBackend.FLASH_ATTENTION)
        peers[(B, ctx, d)] = (c_ms, f_ms, nbytes)
        print(f"peer B={B} ctx={ctx} d={d}: cudnn {c_ms:.4f} ms flash {f_ms:.4f} ms bf16 {nbytes/2**20:.0f} MiB", flush=True)
    if peers_path:
        with open(peers_path, "w") as fh:
            fh.write(json.dumps({"copy_bw": bw}) + "\n")
            for (B, ctx, d), (c, f, n) in peers.items():
                fh.write(json.dumps({"B": B, "ctx": ctx, "d": d, "cudnn_ms": c, "flash_ms": f, "bf16_bytes": n}) + "\n")

    gpu = torch.cuda.get_device_name(0)
    lines = []
    lines.append(f"GPU: {gpu}; torch {torch.__version__}; copy bandwidth {bw/1e12:.2f} TB/s (read + write)\n")
    lines.append("| tag | batch | context | d | bits | dtype | our MiB | floor ms | ours ms | GB/s | % of copy bw | cuDNN ms | flash ms | speedup vs best BF16 |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for o in ours:
        if o["kind"] != "decode":
            continue
        c, f, n = peers.get((o["B"], o["ctx"], o["d"]), (float("nan"),) * 3)
        floor = o["bytes"] / bw * 1e3
        best = min(x for x in (c, f) if x == x) if (c == c or f == f) else float("nan")
        lines.append(
            f"| {o['tag']} {o['method']} | {o['B']} | {o['ctx']//1024}K | {o['d']} | {o['bits']} | {o['dtype']} | "
            f"{o['bytes']/2**20:.1f} | {floor:.4f} | {o['ms']:.4f} | {o['GBps']:.0f} | {100*floor/o['ms']:.0f}% | "
            f"{c:.4f} | {f:.4f} | {best/o['ms']:.2f}x |")
    lines.append("")
    lines.append("| append | tokens | d | bits | input | ms | in MiB | out MiB | GB/s | % of copy bw |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for o in ours:
        if o["kind"] != "append":
            continue
        tot = o["in_bytes"] + o["out_bytes"]
        lines.append(
            f"| {o['tag']} | {o['tokens']//1024}K | {o['d']} | {o['bits']} | {o['dtype']} | {o['ms']:.4f} | "
            f"{o['in_bytes']/2**20:.0f} | {o['out_bytes']/2**20:.1f} | {o['GBps']:.0f} | {100*tot/bw/(o['ms']*1e-3):.0f}% |")
    text = "\n".join(lines) + "\n"
    open(md_path, "w").write(text)
    print(text)


if __name__ == "__main__":
    main()
