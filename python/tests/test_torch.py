"""torch tensors through the binding: CPU tensors here, CUDA tensors in the
[gpu] tests (python3 -m pytest -q python/tests -k gpu). Skipped without torch."""

import numpy as np
import pytest

from conftest import assert_matches_reference, attention_reference, cuda_ready, import_or_skip, small_config

torch = import_or_skip("torch", "torch tensor tests")

import oscar  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cuda():
    ok, why = cuda_ready()
    if not ok:
        pytest.skip("GPU test skipped: " + why)
    return torch.device("cuda", torch.cuda.current_device())


def _kv(n, device, dtype=torch.float32, seed=0, hkv=2, d=64):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, hkv, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(n, hkv, d, generator=g).to(device=device, dtype=dtype)
    return k, v


# ---- CPU tensors -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
def test_torch_cpu_round_trip(dtype):
    c = oscar.OscarPool(small_config())
    ids = c.add_seqs(2)
    k, v = _kv(90, "cpu", dtype)
    c.append(0, ids, [50, 40], k, v)
    q = torch.randn(2, 2, 4, 64).to(dtype)
    out = torch.full((2, 2, 4, 64), float("nan"), dtype=dtype)
    ptr = out.data_ptr()
    assert c.attention(0, ids, q, out=out) is out and out.data_ptr() == ptr
    assert torch.isfinite(out).all()
    for i, s in enumerate(ids):
        kd, vd = c.read(s, 0)
        ref = attention_reference(kd, vd, q[i].float().numpy())
        tol = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}[dtype]
        assert_matches_reference(out[i].float().numpy(), ref, tol, "seq %d" % i)
    alloc = c.attention(0, ids, q)
    assert isinstance(alloc, torch.Tensor) and alloc.dtype == dtype and alloc.device.type == "cpu"
    torch.testing.assert_close(alloc, out, rtol=0, atol=0)
    # read into torch tensors in place
    ko = torch.full((50, 2, 64), float("nan"))
    rk, rv = c.read(ids[0], 0, k_out=ko, v=False)
    assert rk is ko and rv is None and torch.isfinite(ko).all()


def test_torch_cpu_pointer_is_used(monkeypatch):
    c = oscar.OscarPool(small_config())
    s = c.add_seq()
    base = torch.randn(2, 10, 2, 64)
    k, v = base[0], base[1]            # views into one buffer: contiguous, no copy
    seen = {}
    real = oscar._L.append

    def spy(h, layer, n, ids, nt, kp, vp, dt, stream):
        seen["k"], seen["v"], seen["stream"] = kp, vp, stream
        return real(h, layer, n, ids, nt, kp, vp, dt, stream)

    monkeypatch.setattr(oscar._L, "append", spy)
    c.append(0, [s], None, k, v)
    assert seen["k"] == base.data_ptr() and seen["v"] == base[1].data_ptr()
    assert seen["stream"] is None


def test_torch_errors():
    c = oscar.OscarPool(small_config())
    s = c.add_seq()
    k, v = _kv(8, "cpu")
    with pytest.raises(oscar.DTypeError):
        c.append(0, [s], [8], k.double(), v.double())
    with pytest.raises(oscar.DTypeError):
        c.append(0, [s], [8], k.to(torch.int32), v)
    with pytest.raises(oscar.ContiguityError) as ei:
        c.append(0, [s], [8], k.transpose(0, 1).contiguous().transpose(0, 1), v)
    assert "contiguous" in str(ei.value)
    with pytest.raises(oscar.ShapeError):
        c.append(0, [s], [8], k.reshape(8, 128), v.reshape(8, 128))
    with pytest.raises(oscar.DeviceError):
        c.append(0, [s], [8], k.to("meta"), v.to("meta"))
    assert c.info(s, 0).tokens == 0
    c.append(0, [s], [8], k, v)
    q = torch.randn(1, 1, 4, 64)
    with pytest.raises(oscar.ContiguityError):
        c.attention(0, [s], torch.randn(1, 1, 4, 128)[..., ::2])
    with pytest.raises(oscar.DTypeError):
        c.attention(0, [s], q, out=torch.empty(1, 1, 4, 64, dtype=torch.float64))
    with pytest.raises(oscar.DeviceError):
        c.read(s, 0, k_out=torch.empty(8, 2, 64, device="meta"))
    bt = torch.full((1, 4), -1, dtype=torch.int32)
    assert c.block_tables([s], out=bt) is bt
    with pytest.raises(oscar.DTypeError):
        c.block_tables([s], out=torch.zeros(1, 4, dtype=torch.int64))


# ---- CUDA tensors ---------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("method", ["oscar", "kivi", "none"])
def test_gpu_matches_cpu_backend(dtype, method):
    dev = _cuda()
    cfg = small_config(method=method, window_dtype="bf16" if dtype == torch.bfloat16 else "f16")
    gc = oscar.OscarPool(cfg, backend="cuda", device=dev.index)
    cc = oscar.OscarPool(cfg)
    lens = [100, 7, 64]
    gids, cids = gc.add_seqs(3), cc.add_seqs(3)
    k, v = _kv(sum(lens), "cpu", dtype, seed=1)
    for layer in (0, 1):
        gc.append(layer, gids, lens, k.to(dev), v.to(dev))
        cc.append(layer, cids, lens, k, v)
    for gs, cs in zip(gids, cids):
        for layer in (0, 1):
            assert gc.info(gs, layer) == cc.info(cs, layer)
            for x, y in zip(gc.read(gs, layer), cc.read(cs, layer)):
                # Same format; the two backends' fp32 Hadamard transforms may round
                # differently, which can move a rare element by one 16-bit ulp or code.
                mag = max(1.0, float(np.abs(y).max()))
                diff = np.abs(x - y)
                assert (diff > 1e-3 * mag).mean() < 0.01 and diff.max() < 0.5 * mag, diff.max()
    for q_len in (1, 4):
        q = torch.randn(3, q_len, 4, 64, generator=torch.Generator().manual_seed(q_len)).to(dtype)
        out = torch.full((3, q_len, 4, 64), float("nan"), dtype=torch.float32, device=dev)
        ptr = out.data_ptr()
        assert gc.attention(1, gids, q.to(dev), out=out) is out and out.data_ptr() == ptr
        torch.cuda.synchronize()
        ref = cc.attention(1, cids, q, out_dtype="f32")
        assert torch.isfinite(out).all()
        # the GPU kernels may use 16-bit tensor-core operands: a looser bound than CPU-vs-CPU
        torch.testing.assert_close(out.cpu(), ref, atol=1e-2, rtol=1e-2)
        for i, s in enumerate(cids):
            kd, vd = cc.read(s, 1)
            r64 = attention_reference(kd, vd, q[i].float().numpy())
            assert_matches_reference(out[i].cpu().numpy(), r64, 1e-2, "gpu seq %d q_len %d" % (i, q_len))


@pytest.mark.gpu
def test_gpu_uses_current_stream(monkeypatch):
    dev = _cuda()
    gc = oscar.OscarPool(small_config(), backend="cuda", device=dev.index)
    s = gc.add_seq()
    seen = []
    real_append, real_attention = oscar._L.append, oscar._L.attention

    def spy_append(*a):
        seen.append(a[-1])
        return real_append(*a)

    def spy_attention(*a):
        seen.append(a[-1])
        return real_attention(*a)

    monkeypatch.setattr(oscar._L, "append", spy_append)
    monkeypatch.setattr(oscar._L, "attention", spy_attention)
    side = torch.cuda.Stream(device=dev)
    with torch.cuda.stream(side):
        k, v = _kv(70, dev)
        q = torch.randn(1, 1, 4, 64, device=dev)
        gc.append(0, [s], None, k, v)
        out = torch.full((1, 1, 4, 64), float("nan"), device=dev)
        gc.attention(0, [s], q, out=out)
    side.synchronize()
    assert seen == [side.cuda_stream, side.cuda_stream]
    assert torch.isfinite(out).all()
    kd, vd = gc.read(s, 0)
    ref = attention_reference(kd, vd, q[0].cpu().numpy())
    assert_matches_reference(out[0].cpu().numpy(), ref, 1e-2, "side stream")


@pytest.mark.gpu
def test_gpu_device_errors():
    dev = _cuda()
    gc = oscar.OscarPool(small_config(), backend="cuda", device=dev.index)
    cc = oscar.OscarPool(small_config())
    gs, cs = gc.add_seq(), cc.add_seq()
    k, v = _kv(8, "cpu")
    with pytest.raises(oscar.DeviceError) as ei:
        gc.append(0, [gs], None, k, v)                    # host tensor, CUDA cache
    assert "CUDA backend" in str(ei.value)
    with pytest.raises(oscar.DeviceError):
        gc.append(0, [gs], None, k.numpy(), v.numpy())   # numpy, CUDA cache
    with pytest.raises(oscar.DeviceError) as ei:
        cc.append(0, [cs], None, k.to(dev), v.to(dev))   # CUDA tensor, CPU cache
    assert "CPU backend" in str(ei.value)
    gc.append(0, [gs], None, k.to(dev), v.to(dev))
    cc.append(0, [cs], None, k, v)
    with pytest.raises(oscar.DeviceError):
        gc.attention(0, [gs], torch.randn(1, 1, 4, 64))
    with pytest.raises(oscar.DeviceError):
        gc.attention(0, [gs], torch.randn(1, 1, 4, 64, device=dev), out=torch.empty(1, 1, 4, 64))
    with pytest.raises(oscar.DeviceError):
        cc.attention(0, [cs], torch.randn(1, 1, 4, 64, device=dev))
    with pytest.raises(oscar.DeviceError):
        gc.read(gs, 0, k_out=torch.empty(8, 2, 64, device=dev))
    assert gc.info(gs, 0).tokens == 8 and cc.info(cs, 0).tokens == 8
    if torch.cuda.device_count() > 1:
        other = torch.device("cuda", (dev.index + 1) % torch.cuda.device_count())
        with pytest.raises(oscar.DeviceError):
            gc.append(0, [gs], None, k.to(other), v.to(other))


@pytest.mark.gpu
def test_gpu_export_import_between_backends():
    dev = _cuda()
    cfg = small_config()
    gc = oscar.OscarPool(cfg, backend="cuda", device=dev.index)
    cc = oscar.OscarPool(cfg)
    gs = gc.add_seq()
    k, v = _kv(77, dev, seed=3)
    for layer in (0, 1):
        gc.append(layer, [gs], None, k, v)
    blob = gc.export_seq(gs)
    cs = cc.import_seq(blob)
    assert cc.export_seq(cs) == blob          # the same bytes on both backends
    for layer in (0, 1):
        for x, y in zip(gc.read(gs, layer), cc.read(cs, layer)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    gs2 = gc.import_seq(cc.export_seq(cs))
    q = torch.randn(1, 1, 4, 64, device=dev)
    torch.testing.assert_close(gc.attention(0, [gs], q), gc.attention(0, [gs2], q), rtol=1e-6, atol=1e-6)
    m = gc.memory()
    assert m.seqs_live == 2 and m.blocks_used == 2 * len(gc.block_table(gs)) == 4


@pytest.mark.gpu
def test_gpu_nonfinite_and_pool_errors():
    dev = _cuda()
    gc = oscar.OscarPool(small_config(block_count=2), backend="cuda", device=dev.index)
    s = gc.add_seq()
    k, v = _kv(40, dev)
    k[5, 1, 7] = float("nan")
    # the CUDA backend checks on the device: the append returns, the sequence
    # is failed, and the next synchronize (or poll, append, attention) says so
    gc.append(0, [s], None, k, v)
    with pytest.raises(oscar.NonFiniteError, match="sequence"):
        gc.synchronize()
    gc.poll()  # reported once
    q = torch.randn(1, 1, 4, 64, device=dev)
    out = gc.attention(0, [s], q)
    assert torch.isnan(out).all()  # nothing quantised from NaN is attended to
    gc.free(s)
    s = gc.add_seq()
    k, v = _kv(40, dev)
    gc.append(0, [s], None, k, v)
    gc.synchronize()
    assert torch.isfinite(gc.attention(0, [s], q)).all()
    k, v = _kv(100, dev)
    with pytest.raises(oscar.PoolExhaustedError):
        gc.append(0, [s], None, k, v)
    assert gc.info(s, 0).tokens == 40
