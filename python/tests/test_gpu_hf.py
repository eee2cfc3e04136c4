"""oscar.hf on the CUDA backend: the checks of test_hf.py with CUDA tensors.
Skipped with a message without torch, transformers, a GPU or a CUDA build of
liboscar.so (OSCAR_LIBRARY). Run: python3 -m pytest -q python/tests -k gpu"""

import pytest

from conftest import cuda_ready, import_or_skip

torch = import_or_skip("torch", "GPU Hugging Face tests")
import_or_skip("transformers", "GPU Hugging Face tests")

_ok, _why = cuda_ready()
if not _ok:
    pytest.skip("GPU test skipped: " + _why, allow_module_level=True)

import test_hf  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.hf,
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

DEV = "cuda"


def test_gpu_batch1_greedy():
    test_hf.check_batch1_greedy(DEV)


def test_gpu_quantised_matches_fake_quant():
    test_hf.check_quantised_matches_fake_quant(DEV)


@pytest.mark.parametrize("method", ["none", "oscar"])
def test_gpu_padded_batch4(method):
    test_hf.check_padded_batch4(DEV, method)


def test_gpu_beam2():
    test_hf.check_beam2(DEV)


@pytest.mark.parametrize("method", ["none", "oscar"])
def test_gpu_assisted_decoding(method):
    test_hf.check_assisted(DEV, method)


@pytest.mark.parametrize("method", ["none", "oscar"])
def test_gpu_assisted_decoding_with_sinks(method):
    test_hf.check_assisted(DEV, method, sink_tokens=5)


def test_gpu_chunked_prefill_over_4096():
    test_hf.check_chunked_prefill(DEV)


def test_gpu_bf16_generate():
    from hfutil import generate, make_pair, rel_err
    from oscar.hf import OscarHFCache
    from transformers import DynamicCache
    ref, model, cfg = make_pair(DEV, dtype=torch.bfloat16)
    ids = torch.randint(1, 1000, (2, 300), generator=torch.Generator().manual_seed(1)).to(DEV)
    r = generate(ref, ids, DynamicCache(config=cfg), 20)
    # the 16-bit oscar cache (bf16 window) gives DynamicCache's logits to bf16 rounding
    c16 = OscarHFCache(model.config, method="none", max_cache_len=512)
    g16 = generate(model, ids, c16, 20)
    assert c16.pool.config.window_dtype == "bf16"
    assert rel_err(g16.logits[0].float(), r.logits[0].float()) < 0.05
    # the 2-bit cache runs in bf16 and stores 4x+ less. (Its logits on this random
    # model are 0.72 away in relative L2 on the H200, 2026-11-30: a random model's
    # logits have no margin; accuracy is measured on a real model in docs/ACCURACY.md
    # and against the fake-quant reference in the float32 tests.)
    cache = OscarHFCache(model.config, max_cache_len=512)
    g = generate(model, ids, cache, 20)
    assert cache.pool.config.window_dtype == "bf16"
    assert torch.isfinite(g.logits[0]).all()
    m = cache.memory()
    assert m.packed_bytes_per_token * 4 < m.fp16_bytes_per_token
