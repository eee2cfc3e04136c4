"""Decode-step benchmark in transformers: BF16 SDPA + StaticCache (compiled) against
OscarHFCache (compiled), at the Qwen3-8B shape with random bf16 weights.

    OSCAR_LIBRARY=/path/to/cuda/build/liboscar.so \
        python3 python/bench/bench_hf.py --out bench_hf.json

For each batch B and context C: the cache is brought to C tokens per row
(StaticCache: its length counter is set, the K/V stay zero; oscar: random
K/V appended through torch.ops.oscar.append in pieces of 4096), then the
forward of one new token per row runs under torch.compile(mode=
"reduce-overhead", fullgraph=True): warm-up steps (compilation, CUDA graph
recording), then --steps timed steps (CUDA events around each call). Reported:
median and p90 ms per step and tokens/s (B / median). A configuration whose
KV cache does not fit next to the weights is reported as skipped. Attention
reads every cached token whatever its value, so zero or random K/V time the
same as a real prompt. JSON goes to --out (date, GPU, versions, commit).
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import oscar
import oscar.hf


def qwen3_8b_config(layers):
    from transformers import Qwen3Config
    return Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                       num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, max_position_embeddings=262144, rope_theta=1000000.0,
                       use_sliding_window=False, tie_word_embeddings=False)


def cache_kwarg(model):
    import inspect
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except Exception:
        return None


def time_steps(step, make_inputs, warmup, steps):
    """Median/p90 ms of `steps` calls after `warmup` calls, with CUDA events."""
    times = []
    for i in range(warmup + steps):
        args = make_inputs(i)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(*args)
        end.record()
        if i >= warmup:
            times.append((start, end))
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in times)
    return statistics.median(ms), ms[int(0.9 * (len(ms) - 1))]


def bf16_case(model, B, ctx, args):
    from transformers import StaticCache
    cfg = model.config
    max_len = ctx + args.warmup + args.steps + 8
    need = B * max_len * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    free, _ = torch.cuda.mem_get_info()
    if need > free - args.headroom_gb * 2**30:
        return {"skipped": "BF16 KV cache of %.1f GB does not fit (%.1f GB free)" % (need / 2**30, free / 2**30)}
    model.set_attn_implementation("sdpa")
    cache = StaticCache(config=cfg, max_cache_len=max_len)
    cache.early_initialization(batch_size=B, num_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                               dtype=torch.bfloat16, device=torch.device("cuda"))
    for layer in cache.layers:
        if not isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
            raise SystemExit("this transformers version's StaticLayer has no cumulative_length tensor")
        layer.cumulative_length.fill_(ctx)
    kw = {cache_kwarg(model): cache}
    fwd = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    ids = torch.randint(0, cfg.vocab_size, (B, 1), device="cuda")

    def inputs(i):
        return (ids, torch.full((B, 1), ctx + i, device="cuda"))

    def step(x, pos):
        with torch.no_grad():
            return fwd(x, position_ids=pos, use_cache=True, logits_to_keep=1, **kw)

    med, p90 = time_steps(step, inputs, args.warmup, args.steps)
    out = {"ms_median": med, "ms_p90": p90, "tokens_per_s": B / med * 1000, "kv_bytes": need}
    del cache
    return out


def oscar_case(model, B, ctx, args):
    cfg = model.config
    max_len = ctx + args.warmup + args.steps + 8
    model.set_attn_implementation("oscar")
    cache = oscar.hf.OscarHFCache(cfg, max_cache_len=max_len, max_batch_size=B, window_dtype="bf16",
                                  residual=args.residual)
    kw = {cache_kwarg(model): cache}
    with torch.no_grad():   # one real token per row creates the pool and the rows
        model(torch.randint(0, cfg.vocab_size, (B, 1), device="cuda"), use_cache=True, logits_to_keep=1, **kw)
    fill_oscar(cache, B, ctx, cfg)
    mem = cache.memory()
    kw = {cache_kwarg(model): cache}
    fwd = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    ids = torch.randint(0, cfg.vocab_size, (B, 1), device="cuda")

    def inputs(i):
        return (ids, torch.full((B, 1), ctx + i, device="cuda"))

    def step(x, pos):
        with torch.no_grad():
            return fwd(x, position_ids=pos, use_cache=True, logits_to_keep=1, **kw)

    med, p90 = time_steps(step, inputs, args.warmup, args.steps)
    cache.check()
    assert cache.seq_lengths == [ctx + args.warmup + args.steps] * B, cache.seq_lengths
    out = {"ms_median": med, "ms_p90": p90, "tokens_per_s": B / med * 1000,
           "kv_bytes": mem.pool_bytes + mem.window_bytes}
    cache.close()
    return out


def oscar_bytes(cfg, rows, max_len, args):
    """Bytes the oscar pool (pool, windows, workspace) takes for `rows` rows of max_len
    positions, as OscarHFCache sizes it at its first forward."""
    probe = oscar.hf.OscarHFCache(num_layers=cfg.num_hidden_layers, num_q_heads=cfg.num_attention_heads,
                                  num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                                  max_cache_len=max_len, max_batch_size=rows, window_dtype="bf16",
                                  residual=args.residual)
    need = oscar.OscarConfig(window_dtype="bf16", caller_metadata=1, block_count=rows * probe._nb,
                             max_seqs=2 * rows, backend="cuda", **probe._spec).memory_requirements()
    return sum(need[k] + need["alignment"] for k in ("pool", "windows", "workspace"))


def largest_batch(which, cfg, ctx, args):
    """The most rows whose KV cache fits in the free memory less --headroom-gb."""
    max_len = ctx + args.warmup + args.steps + 8
    free = torch.cuda.mem_get_info()[0] - args.headroom_gb * 2**30
    if which == "bf16":
        per_row = max_len * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
        return max(0, int(free // per_row))
    one, two = oscar_bytes(cfg, 1, max_len, args), oscar_bytes(cfg, 2, max_len, args)
    per_row = two - one
    return max(0, int((free - (one - per_row)) // per_row))


def fill_oscar(cache, B, ctx, cfg):
    """Rows from 1 to ctx tokens: random bf16 K/V appended in pieces of <= 4096 through the op
    (benchmark-only: sets the cache's host mirror of lengths to match)."""
    from oscar.hf import _packed_after
    hkv, d = cfg.num_key_value_heads, cfg.head_dim
    g = torch.Generator(device="cuda").manual_seed(0)
    piece = 4096
    k = torch.randn(B * piece, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B * piece, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
    n = 1
    while n < ctx:
        t = min(piece, ctx - n)
        lens = torch.full((B,), n + t, dtype=torch.int32, device="cuda")
        for layer in range(cfg.num_hidden_layers):
            torch.ops.oscar.append(cache._handle, layer, k[:B * t], v[:B * t], lens, cache._slots_dev[:B],
                                   cache._tables_dev[:B], cache.max_cache_len, None)
        n += t
    torch.cuda.synchronize()
    cache._lens = [ctx] * B
    cache._packed = [_packed_after(p, ctx, cache._R, cache._L) for p in cache._packed]
    cache._hf_len = ctx
    cache._upload_rows()
    cache.check()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="*", default=[32768, 131072])
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--headroom-gb", type=float, default=12.0)
    ap.add_argument("--which", nargs="+", default=["bf16", "oscar"], choices=["bf16", "oscar"])
    ap.add_argument("--largest", type=int, nargs="*", default=[], metavar="CTX",
                    help="also run each cache at the largest batch that fits at these contexts")
    ap.add_argument("--out", default="bench_hf.json")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not oscar.backend_available("cuda"):
        raise SystemExit("bench_hf.py needs a GPU and a CUDA build of liboscar.so (OSCAR_LIBRARY)")
    oscar.hf.register()
    from transformers import Qwen3ForCausalLM
    import transformers
    torch.manual_seed(0)
    cfg = qwen3_8b_config(args.layers)
    cfg._attn_implementation = "sdpa"
    t0 = time.time()
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = Qwen3ForCausalLM(cfg).eval()
        torch.set_default_dtype(torch.float32)
    print("model built in %.0f s, %.1f GB of weights" % (
        time.time() - t0, sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30), flush=True)
    cases = [(ctx, B, which) for ctx in args.contexts for B in args.batches for which in args.which]
    for ctx in args.largest:
        for which in args.which:
            torch.cuda.empty_cache()
            B = largest_batch(which, model.config, ctx, args)
            print("largest %s batch at %d tokens: %d rows" % (which, ctx, B), flush=True)
            if B > 0:
                cases.append((ctx, B, which))
    results = []
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "transformers": transformers.__version__, "oscar": oscar.__version__, "commit": commit(),
           "model": "Qwen3-8B shape (%d layers, Hq 32, Hkv 8, d 128), random bf16 weights" % args.layers,
           "compile": 'torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)',
           "argv": sys.argv[1:], "results": results}
    for ctx, B, which in cases:
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        t = time.time()
        try:
            r = (bf16_case if which == "bf16" else oscar_case)(model, B, ctx, args)
        except torch.cuda.OutOfMemoryError as e:
            r = {"skipped": "out of memory: %s" % str(e).splitlines()[0]}
        r.update({"cache": which, "batch": B, "context": ctx, "wall_s": round(time.time() - t, 1)})
        print(json.dumps(r), flush=True)
        results.append(r)
        with open(args.out, "w") as f:   # after every case: a timed-out run keeps what it measured
            json.dump(doc, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
