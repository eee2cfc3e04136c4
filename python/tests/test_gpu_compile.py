"""The CUDA path of torch.ops.oscar: against the sequence API, a decode step under
torch.compile(mode="reduce-overhead") (CUDA graphs through inductor) and inside an
explicit torch.cuda.CUDAGraph, replayed across block boundaries. Skipped with a
message without a GPU and a CUDA build of liboscar.so."""

import pytest

from conftest import cuda_ready, import_or_skip

torch = import_or_skip("torch", "GPU compile tests")
import_or_skip("transformers", "GPU compile tests")

_ok, _why = cuda_ready()
if not _ok:
    pytest.skip("GPU test skipped: " + _why, allow_module_level=True)

from oscar.hf import OscarHFCache  # noqa: E402

import test_ops  # noqa: E402
from hfutil import cache_kwarg, make_pair, rel_err  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

DEV = "cuda"


def test_gpu_ops_match_the_cpu_sequence_api():
    for got, ref in test_ops.run_against_sequence_api(DEV):
        torch.testing.assert_close(got, ref, atol=1e-2, rtol=1e-2)


def _eager_steps(model, tokens, prompt, residual):
    cache = OscarHFCache(model.config, window_dtype="f32", residual=residual, max_cache_len=512)
    kw = {cache_kwarg(model): cache}
    out = []
    with torch.no_grad():
        model(tokens[:, :prompt], **kw)
        for i in range(prompt, tokens.shape[1]):
            r = model(tokens[:, i:i + 1], position_ids=torch.full((tokens.shape[0], 1), i, device=DEV), **kw)
            out.append(r.logits[:, -1])
    return torch.stack(out), cache


def test_gpu_reduce_overhead_decode():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    _, model, _ = make_pair(DEV)
    B, prompt, n = 3, 50, 120
    tokens = torch.randint(1, 1000, (B, prompt + n), generator=torch.Generator().manual_seed(2)).to(DEV)
    eager, ce = _eager_steps(model, tokens, prompt, 32)
    cache = OscarHFCache(model.config, window_dtype="f32", residual=32, max_cache_len=512)
    kw = {cache_kwarg(model): cache}
    step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    outs = []
    with torch.no_grad():
        model(tokens[:, :prompt], **kw)
        for i in range(prompt, prompt + n):
            r = step(tokens[:, i:i + 1].clone(), position_ids=torch.full((B, 1), i, device=DEV), **kw)
            outs.append(r.logits[:, -1].clone())
    got = torch.stack(outs)
    torch.cuda.synchronize()
    cache.check()
    assert cache.seq_lengths == ce.seq_lengths == [prompt + n] * B   # packing inside replays
    assert rel_err(got, eager) < 1e-3
    assert dict(counters["graph_break"]) == {}
    assert counters["inductor"].get("cudagraph_skips", 0) == 0, dict(counters["inductor"])
    torch._dynamo.reset()


def test_gpu_explicit_cuda_graph_decode():
    _, model, _ = make_pair(DEV)
    B, prompt, n = 3, 40, 150
    tokens = torch.randint(1, 1000, (B, prompt + n), generator=torch.Generator().manual_seed(3)).to(DEV)
    eager, _ = _eager_steps(model, tokens, prompt, 32)
    cache = OscarHFCache(model.config, window_dtype="f32", residual=32, max_cache_len=512)
    kw = {cache_kwarg(model): cache}
    static_ids = tokens[:, prompt:prompt + 1].clone()
    static_pos = torch.full((B, 1), prompt, device=DEV)
    outs = []
    with torch.no_grad():
        model(tokens[:, :prompt], **kw)
        # warm up on a side stream (a real step: token `prompt`), as torch.cuda.graph wants
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            r = model(static_ids, position_ids=static_pos, **kw)
        torch.cuda.current_stream().wait_stream(side)
        outs.append(r.logits[:, -1].clone())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(static_ids, position_ids=static_pos, **kw).logits
        for i in range(prompt + 1, prompt + n):
            static_ids.copy_(tokens[:, i:i + 1])
            static_pos.fill_(i)
            graph.replay()
            outs.append(static_out[:, -1].clone())
    torch.cuda.synchronize()
    cache.check()
    assert cache.seq_lengths == [prompt + n] * B
    assert rel_err(torch.stack(outs), eager) < 1e-4
