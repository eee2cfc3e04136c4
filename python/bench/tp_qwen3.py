"""Tensor-parallel decoding with oscar.hf.OscarHFCache through torch.distributed.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
        torchrun --nproc-per-node 2 python/bench/tp_qwen3.py --check

A Qwen3-shaped model with random weights (saved once to --workdir, no
download) is loaded with transformers' tp_plan="auto": each rank holds half
the query and KV heads. Each rank's OscarHFCache holds its own heads and
finishes every append with the key norms over all heads: per-head sums of
squares (torch.ops.oscar.key_sumsq), all-gathered over the group
(tp_group=...), then the append (docs/ENGINES.md, section 8). The codes are
then exactly those of one cache holding every head.

--check: rank 0 also runs the same steps on one GPU without tensor
parallelism and compares the logits (prints "TP CHECK OK" or exits 1), for
two caches:
- a 16-bit cache (method "none"): the tensor-parallel plumbing (head order,
  rows, windows) must give the 1-GPU logits within float tolerance;
- the 2-bit OScaR cache: the two runs' K/V differ by float rounding (sharded
  GEMMs, the all-reduce's order), and a 2-bit code at a rounding boundary
  flips, so the logits cannot agree to float tolerance. The check is that
  the TP error is under 5% of the 2-bit cache's own error (1-GPU
  2-bit against 1-GPU 16-bit): local norms instead of all-gathered ones
  quantise differently and give 13% of it
  (--mutate-local-norms shows it: the check then fails).
"""

import argparse
import os

# NVLink multicast stays off on the test machines (NVLS, symmetric memory).
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import oscar.hf  # noqa: E402


def cache_kwarg(model):
    import inspect
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def make_checkpoint(path, args):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=4096, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, head_dim=128, max_position_embeddings=8192,
                      use_sliding_window=False)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    model.save_pretrained(path)


def run_steps(model, tokens, prompt, cache):
    kw = {cache_kwarg(model): cache}
    out = []
    with torch.no_grad():
        r = model(tokens[:, :prompt], **kw)
        out.append(r.logits[:, -1].float())
        for i in range(prompt, tokens.shape[1]):
            r = model(tokens[:, i:i + 1], **kw)
            out.append(r.logits[:, -1].float())
    return torch.stack(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/oscar-tp")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=300)
    ap.add_argument("--new", type=int, default=40)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--mutate-local-norms", action="store_true",
                    help="test of the test: norm keys over each rank's own heads (the check must fail)")
    args = ap.parse_args()

    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    rank, world = dist.get_rank(), dist.get_world_size()
    oscar.hf.register()
    ckpt = os.path.join(args.workdir, "qwen3-random")
    if rank == 0 and not os.path.exists(os.path.join(ckpt, "config.json")):
        make_checkpoint(ckpt, args)
    dist.barrier()

    from transformers import AutoModelForCausalLM
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(ckpt, tp_plan="auto", dtype=dtype,
                                                 attn_implementation="oscar").eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 4096, (args.batch, args.prompt + args.new), generator=g).cuda()
    window = "f32" if dtype == torch.float32 else "bf16"
    max_len = args.prompt + args.new + 8

    def logits_of(m, method, tp_group):
        cache = oscar.hf.OscarHFCache(m.config, tp_group=tp_group, window_dtype=window, max_cache_len=max_len,
                                      method=method, bits=2)
        if args.mutate_local_norms and tp_group is not None:
            cache._tp = 1   # test of the test: skip the all-gather, each rank norms over its own heads
        out = run_steps(m, tokens, args.prompt, cache)
        cache.check()
        print("rank %d, %s: %d of %d KV heads, %s real tokens per row, packed %s"
              % (rank, method, cache.pool.config.num_kv_heads, m.config.num_key_value_heads,
                 cache.seq_lengths, cache._packed), flush=True)
        return out, cache.pool.config.num_kv_heads

    tp16, local_heads = logits_of(model, "none", dist.group.WORLD)
    tp2, _ = logits_of(model, "oscar", dist.group.WORLD)
    ok = True
    if args.check and rank == 0:
        one = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="oscar").cuda().eval()
        ref16, _ = logits_of(one, "none", None)
        ref2, _ = logits_of(one, "oscar", None)

        def rel(a, b):
            return ((a - b).norm() / b.norm()).item()
        err16, err2, quant = rel(tp16, ref16), rel(tp2, ref2), rel(ref2, ref16)
        tol16 = 1e-4 if dtype == torch.float32 else 2e-2
        ok = err16 < tol16 and err2 < 0.05 * quant and local_heads * world == model.config.num_key_value_heads
        print("16-bit cache: TP against 1 GPU, relative logit error %.3g (tolerance %g)" % (err16, tol16))
        print("2-bit cache: TP against 1 GPU %.3g; the 2-bit cache's own error (1 GPU, against 16-bit) %.3g;"
              " ratio %.3f (tolerance 0.05)" % (err2, quant, err2 / quant))
        print("TP CHECK %s: %d ranks" % ("OK" if ok else "FAILED", world), flush=True)
    flag = torch.tensor([0 if ok else 1], device="cuda")
    dist.all_reduce(flag)
    dist.destroy_process_group()
    raise SystemExit(int(flag.item() != 0))


if __name__ == "__main__":
    main()
