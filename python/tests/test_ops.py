"""torch.ops.oscar (oscar.ops): registration, fake tensors, results against the
sequence API and a float64 reference, opcheck, and errors. CPU backend; the
CUDA variants are in test_gpu_compile.py."""

import pytest

from conftest import assert_matches_reference, attention_reference, import_or_skip, small_config

torch = import_or_skip("torch", "torch custom op tests")

import oscar  # noqa: E402
import oscar.ops  # noqa: E402,F401

R = 32


def batch_pool(device="cpu", **kw):
    cfg = small_config(caller_metadata=1, residual=R, block_count=32, max_seqs=4, **kw)
    if device != "cpu":
        cfg = cfg.replace(backend="cuda", device=torch.device(device).index or 0)
    return oscar.OscarPool(cfg)


def metadata(lens, device="cpu", stride=8):
    """Slots 0..n-1 and disjoint block tables: sequence i owns blocks [i*stride, (i+1)*stride)."""
    n = len(lens)
    tables = torch.arange(n * stride, dtype=torch.int32).reshape(n, stride)
    return (torch.tensor(lens, dtype=torch.int32, device=device),
            torch.arange(n, dtype=torch.int32, device=device), tables.to(device))


def kv(n, seed, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, 64, generator=g).to(device, dtype),
            torch.randn(n, 2, 64, generator=g).to(device, dtype))


def run_against_sequence_api(device):
    """Prefill 70 and 45 tokens (pieces of 35 and 1), then 30 decode steps through the ops;
    the same appends through the sequence API; attention outputs equal."""
    pool = batch_pool(device)
    seq_pool = oscar.OscarPool(small_config(residual=R, block_count=32, max_seqs=4))
    ids = seq_pool.add_seqs(2)
    lens = [0, 0]
    max_len = 200
    outs = []
    steps = [35, 35] + [1] * 30
    for step, t in enumerate(steps):
        k, v = kv(2 * t, step)
        lens = [n + t for n in lens]
        seq_lens, slots, tables = metadata(lens, device)
        q = torch.randn(2, t, 4, 64, generator=torch.Generator().manual_seed(100 + step))
        for layer in (0, 1):
            tok = torch.ops.oscar.append(pool.handle, layer, k.to(device), v.to(device), seq_lens, slots,
                                         tables, max_len, None)
            out = torch.ops.oscar.attention(pool.handle, layer, q.to(device), seq_lens, slots, tables,
                                            max_len, 0.0, tok)
            seq_pool.append(layer, ids, [t, t], k, v)
            ref = seq_pool.attention(layer, ids, q)
            outs.append((out.cpu(), ref))
    for i, s in enumerate(ids):  # float64 attention over what the sequence pool holds
        kd, vd = seq_pool.read(s, 1)
        assert_matches_reference(outs[-1][0][i].numpy(), attention_reference(kd, vd, q[i].numpy()),
                                 2e-4 if device == "cpu" else 1e-2, "seq %d" % i)
    assert seq_pool.info(ids[0], 1).packed_tokens == 96   # blocks were packed on the way
    return outs


def test_ops_equal_the_sequence_api():
    for got, ref in run_against_sequence_api("cpu"):
        assert torch.equal(got, ref)


def test_ops_are_registered_with_schemas():
    for name in ("append", "attention", "key_sumsq"):
        op = getattr(torch.ops.oscar, name)
        assert "oscar::%s" % name in str(op.default._schema)
    assert "Tensor token" in str(torch.ops.oscar.attention.default._schema)


def test_fake_tensors_never_call_the_library():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        k = torch.empty(6, 2, 64)
        q = torch.empty(3, 2, 4, 64, dtype=torch.bfloat16)
        lens, slots, tables = (torch.empty(3, dtype=torch.int32), torch.empty(3, dtype=torch.int32),
                               torch.empty(3, 5, dtype=torch.int32))
        # handle 0 would raise in the real implementation
        tok = torch.ops.oscar.append(0, 0, k, k, lens, slots, tables, 100, None)
        out = torch.ops.oscar.attention(0, 0, q, lens, slots, tables, 100, 0.0, tok)
        sums = torch.ops.oscar.key_sumsq(0, k)
        assert out.shape == q.shape and out.dtype == torch.bfloat16
        assert sums.shape == (6, 2) and sums.dtype == torch.float32
        with pytest.raises(oscar.ShapeError):
            torch.ops.oscar.append(0, 0, torch.empty(7, 2, 64), torch.empty(7, 2, 64), lens, slots,
                                   tables, 100, None)


def test_opcheck():
    pool = batch_pool()
    lens, slots, tables = metadata([40, 8])
    k, v = kv(2 * 8, 0)
    # a first append of 40/8 tokens would differ per row: start both rows at 8, then grow row 0
    seq_lens = torch.tensor([8, 8], dtype=torch.int32)
    tok = torch.ops.oscar.append(pool.handle, 0, k, v, seq_lens, slots, tables, 100, None)
    # the batch API is idempotent for a fixed seq_lens: opcheck may run the append repeatedly
    torch.library.opcheck(torch.ops.oscar.append.default,
                          (pool.handle, 0, k, v, seq_lens, slots, tables, 100, None))
    q = torch.randn(2, 1, 4, 64)
    torch.library.opcheck(torch.ops.oscar.attention.default,
                          (pool.handle, 0, q, seq_lens, slots, tables, 100, 0.0, tok))
    torch.library.opcheck(torch.ops.oscar.key_sumsq.default, (pool.handle, k))


def test_key_sumsq_is_the_norm_hook():
    """Phase 1 + phase 2 with one shard holding every head equals a plain append (test_tp
    checks split shards in C); the sums are the rotated keys' per-head squares."""
    pool_a, pool_b = batch_pool(), batch_pool()
    k, v = kv(2 * 40, 1)
    lens, slots, tables = metadata([40, 40])
    sums = torch.ops.oscar.key_sumsq(pool_a.handle, k)
    # the rotation is orthonormal: per-head sums of squares equal the unrotated ones, up to
    # the f16 window rounding the sums are taken after
    torch.testing.assert_close(sums, k.pow(2).sum(-1), rtol=2e-3, atol=1e-3)
    ta = torch.ops.oscar.append(pool_a.handle, 0, k, v, lens, slots, tables, 100, sums)
    tb = torch.ops.oscar.append(pool_b.handle, 0, k, v, lens, slots, tables, 100, None)
    q = torch.randn(2, 1, 4, 64)
    oa = torch.ops.oscar.attention(pool_a.handle, 0, q, lens, slots, tables, 100, 0.0, ta)
    ob = torch.ops.oscar.attention(pool_b.handle, 0, q, lens, slots, tables, 100, 0.0, tb)
    assert torch.equal(oa, ob)


def test_op_errors_are_clear_and_change_nothing():
    pool = batch_pool()
    lens, slots, tables = metadata([8, 8])
    k, v = kv(16, 2)
    with pytest.raises(oscar.DTypeError, match="int32"):
        torch.ops.oscar.append(pool.handle, 0, k, v, lens.long(), slots, tables, 100, None)
    with pytest.raises(oscar.DTypeError):
        torch.ops.oscar.append(pool.handle, 0, k.double(), v.double(), lens, slots, tables, 100, None)
    with pytest.raises(oscar.ShapeError):
        torch.ops.oscar.append(pool.handle, 0, k[:15], v[:15], lens, slots, tables, 100, None)
    with pytest.raises(oscar.InvalidArgumentError, match="null pool handle"):
        torch.ops.oscar.append(0, 0, k, v, lens, slots, tables, 100, None)
    # the library's own checks: a length above max_seq_len, a repeated slot
    with pytest.raises(oscar.InvalidArgumentError):
        torch.ops.oscar.append(pool.handle, 0, k, v, lens, slots, tables, 4, None)
    with pytest.raises(oscar.InvalidArgumentError):
        torch.ops.oscar.append(pool.handle, 0, k, v, lens, torch.zeros(2, dtype=torch.int32), tables,
                               100, None)
    with pytest.raises(oscar.InvalidArgumentError):
        torch.ops.oscar.append(pool.handle, 7, k, v, lens, slots, tables, 100, None)   # no layer 7
    tok = torch.ops.oscar.append(pool.handle, 0, k, v, lens, slots, tables, 100, None)
    out = torch.ops.oscar.attention(pool.handle, 0, torch.randn(2, 1, 4, 64), lens, slots, tables, 100,
                                    0.0, tok)
    assert torch.isfinite(out).all()


def test_sequence_api_pool_refuses_the_ops():
    pool = oscar.OscarPool(small_config())   # caller_metadata = 0
    lens, slots, tables = metadata([8])
    k, v = kv(8, 3)
    with pytest.raises(oscar.UnsupportedError):
        torch.ops.oscar.append(pool.handle, 0, k, v, lens, slots, tables, 100, None)
