"""torch.compile of a decode step with OscarHFCache on the CPU: fullgraph (no graph
breaks, attention included), no recompiles per step, logits equal to eager steps.
CUDA graphs (mode="reduce-overhead", torch.cuda.CUDAGraph) are in test_gpu_compile.py."""

import pytest

from conftest import import_or_skip

torch = import_or_skip("torch", "torch.compile tests")
import_or_skip("transformers", "torch.compile tests")

from oscar.hf import OscarHFCache  # noqa: E402

from hfutil import cache_kwarg, make_pair  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def decode(model, tokens, prompt, backend=None, residual=16, layers_note=""):
    """Eager prefill of `prompt` tokens, then one compiled (or eager) forward per token."""
    B = tokens.shape[0]
    cache = OscarHFCache(model.config, window_dtype="f32", residual=residual, max_cache_len=128)
    kw = {cache_kwarg(model): cache}
    fwd = model.forward if backend is None else torch.compile(model.forward, fullgraph=True, backend=backend)
    outs = []
    with torch.no_grad():
        model(tokens[:, :prompt], **kw)
        for i in range(prompt, tokens.shape[1]):
            r = fwd(tokens[:, i:i + 1], attention_mask=torch.ones(B, i + 1, dtype=torch.long),
                    position_ids=torch.full((B, 1), i), **kw)
            outs.append(r.logits[:, -1])
    return torch.stack(outs), cache


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_decode_fullgraph(backend):
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    layers = 2 if backend == "aot_eager" else 1
    _, model, _ = make_pair("cpu", layers=layers)
    tokens = torch.randint(1, 1000, (2, 60), generator=torch.Generator().manual_seed(3))
    eager, ce = decode(model, tokens, 40)
    got, cc = decode(model, tokens, 40, backend=backend)
    # 20 compiled steps cross a block boundary (R = 16): packing happens inside them
    assert cc.seq_lengths == ce.seq_lengths == [60, 60] and cc._packed == [3, 3]
    if backend == "aot_eager":
        assert torch.equal(got, eager)
    else:   # inductor fuses the model's own arithmetic differently
        torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)
    assert dict(counters["graph_break"]) == {}
    # the first step compiles, the second generalises the mask length; none after
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    torch._dynamo.reset()


def test_compiled_step_rejects_padding_in_new_tokens():
    torch._dynamo.reset()
    _, model, _ = make_pair("cpu", layers=1)
    cache = OscarHFCache(model.config, window_dtype="f32", residual=16, max_cache_len=64)
    kw = {cache_kwarg(model): cache}
    fwd = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        model(torch.randint(1, 1000, (2, 5)), **kw)
        mask = torch.ones(2, 6, dtype=torch.long)
        mask[1, -1] = 0
        with pytest.raises(RuntimeError, match="padding among its new tokens"):
            fwd(torch.randint(1, 1000, (2, 1)), attention_mask=mask, position_ids=torch.full((2, 1), 5), **kw)
    torch._dynamo.reset()
