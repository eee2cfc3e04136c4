"""CPU tests of the ctypes binding: numpy only (these run in CI)."""

import ctypes
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import oscar
from oscar import _lib, _tensor, errors
from conftest import PYTHON_DIR, assert_matches_reference, attention_reference, small_config


def poison(shape, dtype=np.float32):
    return np.full(shape, np.nan, dtype=dtype)


def kv(rng, n, hkv=2, d=64, dtype=np.float32, scale=1.0):
    k = (rng.standard_normal((n, hkv, d)) * scale).astype(dtype)
    v = (rng.standard_normal((n, hkv, d)) * scale).astype(dtype)
    return k, v


# ---- loading and version ---------------------------------------------------------

def test_version_matches_library():
    from oscar._version import __version__ as pkg
    lib_v = oscar._L.version().decode()
    assert oscar.__version__ == lib_v == pkg == oscar.version()
    h = open(os.path.join(PYTHON_DIR, "..", "include", "oscar.h")).read()
    parts = [h.split("#define OSCAR_VERSION_%s " % n)[1].split()[0] for n in ("MAJOR", "MINOR", "PATCH")]
    assert lib_v == ".".join(parts)


def test_library_has_every_symbol():
    assert oscar._L.missing == [], "liboscar.so lacks %s" % oscar._L.missing
    assert os.path.exists(oscar.library_path)


def _run_import(tmp_path, env_extra, version=None):
    pkg = tmp_path / "oscar"
    shutil.copytree(os.path.join(PYTHON_DIR, "oscar"), pkg,
                    ignore=shutil.ignore_patterns("__pycache__"))
    if version is not None:
        (pkg / "_version.py").write_text('__version__ = "%s"\n' % version)
    env = dict(os.environ)
    env.update(env_extra)
    code = textwrap.dedent("""
        try:
            import oscar
        except ImportError as e:
            print(type(e).__name__ + ": " + str(e))
        else:
            print("imported", oscar.__version__)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=120)
    return r.stdout + r.stderr


def test_version_mismatch_is_an_import_error(tmp_path):
    out = _run_import(tmp_path, {"OSCAR_LIBRARY": oscar.library_path}, version="9.9.9")
    assert "VersionMismatchError" in out and "9.9.9" in out and oscar.__version__ in out, out


def test_missing_library_is_a_clear_import_error(tmp_path):
    out = _run_import(tmp_path, {"OSCAR_LIBRARY": str(tmp_path / "nope" / "liboscar.so")})
    assert "LibraryNotFoundError" in out and "OSCAR_LIBRARY" in out and "make build" in out, out


def test_oscar_library_env_accepts_a_directory(tmp_path):
    out = _run_import(tmp_path, {"OSCAR_LIBRARY": os.path.dirname(oscar.library_path)})
    assert "imported " + oscar.__version__ in out, out


# ---- statuses and exceptions --------------------------------------------------------

def test_status_names_match_library():
    for st in range(0, 9):
        assert errors._STATUS_NAMES[st] == oscar.status_name(st)
    for st in range(1, 9):
        cls = errors.error_class(st)
        assert issubclass(cls, oscar.OscarError) and cls.status == st
        e = errors.make_error(st, "boom")
        assert e.status_name == oscar.status_name(st) and "boom" in str(e)


def test_invalid_config_raises_with_library_message():
    with pytest.raises(oscar.InvalidArgumentError) as ei:
        oscar.OscarPool(small_config(head_dim=100))
    assert ei.value.status == errors.E_INVALID_ARGUMENT
    assert "head_dim" in str(ei.value) or "100" in str(ei.value)
    with pytest.raises(oscar.InvalidArgumentError):
        small_config(num_q_heads=3).validate()      # not a multiple of Hkv
    with pytest.raises(oscar.InvalidArgumentError):
        small_config(method="nosuch")
    with pytest.raises(oscar.DTypeError):
        small_config(window_dtype="int8")


def test_cuda_backend_without_cuda_is_unsupported():
    if oscar.backend_available("cuda"):
        pytest.skip("the CUDA backend is available here")
    with pytest.raises(oscar.UnsupportedError):
        oscar.OscarPool(small_config(backend="cuda"))


def test_unknown_sequence_is_not_found():
    c = oscar.OscarPool(small_config())
    with pytest.raises(oscar.NotFoundError) as ei:
        c.info(12345)
    assert ei.value.status_name == "OSCAR_E_NOT_FOUND" and ei.value.message
    assert isinstance(ei.value, LookupError)
    with pytest.raises(oscar.NotFoundError):
        c.free(777)
    with pytest.raises(oscar.NotFoundError):
        c.fork(777)
    k = np.zeros((1, 2, 64), np.float32)
    with pytest.raises(oscar.NotFoundError):
        c.append(0, [777], [1], k, k)


def test_nonfinite_rejected_and_nothing_appended(rng):
    c = oscar.OscarPool(small_config())
    s = c.add_seq()
    k, v = kv(rng, 5)
    c.append(0, [s], [5], k, v)
    k2, v2 = kv(rng, 40)
    v2[17, 1, 3] = np.inf
    with pytest.raises(oscar.NonFiniteError):
        c.append(0, [s], [40], k2, v2)
    assert c.info(s, 0).tokens == 5          # a failing call changes nothing
    k2[3, 0, 0] = np.nan
    v2[17, 1, 3] = 0
    with pytest.raises(oscar.NonFiniteError):
        c.append(0, [s], [40], k2, v2)
    assert c.info(s, 0).tokens == 5


def test_pool_exhausted(rng):
    c = oscar.OscarPool(small_config(block_count=2, max_seqs=2))
    s = c.add_seq()
    k, v = kv(rng, 64)
    c.append(0, [s], [64], k, v)            # two full blocks
    before = c.memory()
    assert before.blocks_free == 0
    k, v = kv(rng, 32)
    with pytest.raises(oscar.PoolExhaustedError) as ei:
        c.append(0, [s], [32], k, v)
    assert ei.value.status_name == "OSCAR_E_POOL_EXHAUSTED" and ei.value.message
    assert c.info(s, 0).tokens == 64
    c.add_seq()
    with pytest.raises(oscar.PoolExhaustedError):   # max_seqs = 2
        c.add_seq()


def test_library_side_argument_errors(rng):
    c = oscar.OscarPool(small_config())
    s = c.add_seq()
    k, v = kv(rng, 4)
    with pytest.raises(oscar.InvalidArgumentError) as ei:
        c.append(5, [s], [4], k, v)            # layer out of range: the library says so
    assert "layer" in ei.value.message
    c.append(0, [s], [4], k, v)
    q = np.zeros((1, 8, 4, 64), np.float32)
    with pytest.raises(oscar.InvalidArgumentError) as ei:
        c.attention(0, [s], q)                 # q_len 8 > 4 tokens
    assert "q_len" in ei.value.message
    with pytest.raises(oscar.InvalidArgumentError):
        c.append(0, [s, s], [2, 2], k, v)      # duplicate sequence


def test_closed_cache_raises():
    c = oscar.OscarPool(small_config())
    c.close()
    c.close()
    with pytest.raises(oscar.InvalidArgumentError):
        c.add_seq()


# ---- python-side tensor checks -----------------------------------------------------

def test_bad_dtype_shape_and_contiguity(rng):
    c = oscar.OscarPool(small_config())
    s = c.add_seq()
    k, v = kv(rng, 6)
    with pytest.raises(oscar.DTypeError) as ei:
        c.append(0, [s], [6], k.astype(np.float64), v.astype(np.float64))
    assert "float64" in str(ei.value) and isinstance(ei.value, TypeError)
    with pytest.raises(oscar.DTypeError):
        c.append(0, [s], [6], k.astype(np.int32), v)
    with pytest.raises(oscar.DTypeError):                      # k and v must agree
        c.append(0, [s], [6], k, v.astype(np.float16))
    with pytest.raises(oscar.DTypeError):
        c.append(0, [s], [6], k.tolist(), v)
    with pytest.raises(oscar.ShapeError) as ei:
        c.append(0, [s], [6], k.reshape(6, 128), v.reshape(6, 128))
    assert "[6, 128]" in str(ei.value)
    with pytest.raises(oscar.ShapeError):
        c.append(0, [s], [6], k[:, :, :32].copy(), v[:, :, :32].copy())
    with pytest.raises(oscar.ShapeError):                      # sum(n_tokens) != rows
        c.append(0, [s], [5], k, v)
    big = rng.standard_normal((6, 2, 128)).astype(np.float32)
    with pytest.raises(oscar.ContiguityError) as ei:
        c.append(0, [s], [6], big[:, :, ::2], big[:, :, 1::2])
    assert "contiguous" in str(ei.value)
    kt = np.ascontiguousarray(k.transpose(1, 0, 2)).transpose(1, 0, 2)   # right shape, wrong strides
    with pytest.raises(oscar.ContiguityError):
        c.append(0, [s], [6], kt, v)
    assert c.info(s, 0).tokens == 0
    c.append(0, [s], [6], k, v)
    q = rng.standard_normal((1, 1, 4, 64)).astype(np.float32)
    with pytest.raises(oscar.ShapeError):
        c.attention(0, [s], q.reshape(1, 1, 2, 128))
    with pytest.raises(oscar.ShapeError):
        c.attention(0, [s], q, out=np.empty((1, 1, 4, 32), np.float32))
    with pytest.raises(oscar.DTypeError):
        c.attention(0, [s], q, out=np.empty((1, 1, 4, 64), np.float64))
    qbig = rng.standard_normal((1, 1, 4, 128)).astype(np.float32)
    with pytest.raises(oscar.ContiguityError):
        c.attention(0, [s], qbig[..., ::2])
    ro = np.empty((1, 1, 4, 64), np.float32)
    ro.flags.writeable = False
    with pytest.raises(oscar.InvalidArgumentError):
        c.attention(0, [s], q, out=ro)
    with pytest.raises(oscar.ShapeError):           # 3-D q means q_len 1
        c.attention(0, [s], q[0], q_len=2)


def test_device_check_messages():
    v = _tensor.View(None, 0, _lib.DTYPE_F32, (1,), "cuda", 0, "torch")
    with pytest.raises(oscar.DeviceError) as ei:
        _tensor.check_device(v, _lib.BACKEND_CPU, 0, "k")
    assert "CPU backend" in str(ei.value) and "cuda:0" in str(ei.value)
    v = _tensor.View(None, 0, _lib.DTYPE_F32, (1,), "cpu", 0, "numpy")
    with pytest.raises(oscar.DeviceError) as ei:
        _tensor.check_device(v, _lib.BACKEND_CUDA, 1, "q")
    assert "CUDA backend" in str(ei.value) and "cuda:1" in str(ei.value)
    v = _tensor.View(None, 0, _lib.DTYPE_F32, (1,), "cuda", 0, "torch")
    with pytest.raises(oscar.DeviceError):
        _tensor.check_device(v, _lib.BACKEND_CUDA, 1, "q")
    assert issubclass(oscar.DeviceError, oscar.InvalidArgumentError)


# ---- zero copy ---------------------------------------------------------------------

def test_inputs_are_passed_by_pointer(monkeypatch, rng):
    c = oscar.OscarPool(small_config())
    s = c.add_seq()
    k, v = kv(rng, 10)
    q = rng.standard_normal((1, 1, 4, 64)).astype(np.float32)
    out = poison((1, 1, 4, 64))
    seen = {}
    real_append, real_attention = oscar._L.append, oscar._L.attention

    def spy_append(h, layer, n, ids, nt, kp, vp, dt, stream):
        seen["k"], seen["v"] = kp, vp
        return real_append(h, layer, n, ids, nt, kp, vp, dt, stream)

    def spy_attention(h, layer, n, ids, q_len, qp, qdt, op, odt, scale, stream):
        seen["q"], seen["out"] = qp, op
        return real_attention(h, layer, n, ids, q_len, qp, qdt, op, odt, scale, stream)

    monkeypatch.setattr(oscar._L, "append", spy_append)
    monkeypatch.setattr(oscar._L, "attention", spy_attention)
    c.append(0, [s], [10], k, v)
    ret = c.attention(0, [s], q, out=out)
    assert seen["k"] == k.ctypes.data and seen["v"] == v.ctypes.data
    assert seen["q"] == q.ctypes.data and seen["out"] == out.ctypes.data
    assert ret is out and np.isfinite(out).all()


def test_output_written_in_place_and_matches_allocating_call(rng):
    c = oscar.OscarPool(small_config())
    s = c.add_seq()
    k, v = kv(rng, 50)
    c.append(1, [s], [50], k, v)
    q = rng.standard_normal((1, 1, 4, 64)).astype(np.float32)
    out = poison((1, 1, 4, 64))
    ptr = out.ctypes.data
    assert c.attention(1, [s], q, out=out) is out
    assert out.ctypes.data == ptr and np.isfinite(out).all()
    alloc = c.attention(1, [s], q)
    assert alloc.dtype == np.float32 and alloc.shape == (1, 1, 4, 64)
    np.testing.assert_array_equal(alloc, out)
    # a view into a bigger buffer is filled in place too
    buf = poison((3, 1, 4, 64))
    c.attention(1, [s], q, out=buf[1:2])
    assert np.isnan(buf[0]).all() and np.isnan(buf[2]).all()
    np.testing.assert_array_equal(buf[1:2], out)
    # read() fills given arrays in place
    ko, vo = poison((50, 2, 64)), poison((50, 2, 64))
    rk, rv = c.read(s, 1, k_out=ko, v_out=vo)
    assert rk is ko and rv is vo and np.isfinite(ko).all() and np.isfinite(vo).all()


# ---- numerics against a float64 reference ----------------------------------------------

@pytest.mark.parametrize("method", ["oscar", "kivi", "quarot", "scale-only", "none"])
@pytest.mark.parametrize("window", ["f32", "f16"])
def test_attention_matches_reference_over_dequantised_kv(rng, method, window):
    c = oscar.OscarPool(small_config(method=method, window_dtype=window))
    ids = c.add_seqs(3)
    lens = [70, 5, 33]           # packed + window, window only, one block + 1
    ks, vs = [], []
    for n in lens:
        k, v = kv(rng, n, scale=2.0)
        k[0] *= 0.05             # a small-norm "sink" token
        ks.append(k)
        vs.append(v)
    c.append(0, ids, lens, np.concatenate(ks), np.concatenate(vs))
    for s, n in zip(ids, lens):
        info = c.info(s, 0)
        assert (info.tokens, info.packed_tokens, info.window_tokens) == (n, n // 32 * 32, n % 32)
        assert c.info(s, 1).tokens == 0
    for q_len in (1, 3):
        q = rng.standard_normal((3, q_len, 4, 64)).astype(np.float32)
        out = poison(q.shape)
        c.attention(0, ids, q, out=out)
        assert np.isfinite(out).all()
        for i, s in enumerate(ids):
            kd, vd = c.read(s, 0)
            ref = attention_reference(kd, vd, q[i])
            assert_matches_reference(out[i], ref, 2e-4, "%s/%s q_len %d seq %d" % (method, window, q_len, i))


def test_dequantised_kv_close_to_input_and_window_exact(rng):
    c = oscar.OscarPool(small_config(window_dtype="f32"))
    s = c.add_seq()
    k, v = kv(rng, 80)
    c.append(0, [s], [80], k, v)
    kd, vd = c.read(s, 0)
    # window tokens (64..79): exact up to the two fp32 Hadamard transforms
    np.testing.assert_allclose(kd[64:], k[64:], atol=1e-5)
    np.testing.assert_allclose(vd[64:], v[64:], atol=1e-5)
    # packed tokens: 2-bit quantisation error, bounded, and clearly not exact
    for x, xd in ((k, kd), (v, vd)):
        rel = np.linalg.norm(xd[:64] - x[:64]) / np.linalg.norm(x[:64])
        assert 0.01 < rel < 0.6, rel
    # partial reads agree with the full read
    k2, v2 = c.read(s, 0, 30, 40)
    np.testing.assert_array_equal(k2, kd[30:70])
    np.testing.assert_array_equal(v2, vd[30:70])
    only_k, none_v = c.read(s, 0, 0, 10, v=False)
    assert none_v is None
    np.testing.assert_array_equal(only_k, kd[:10])


def test_method_none_f32_is_exact_attention(rng):
    c = oscar.OscarPool(small_config(method="none", window_dtype="f32"))
    s = c.add_seq()
    k, v = kv(rng, 100)
    c.append(0, [s], [100], k, v)
    q = rng.standard_normal((1, 2, 4, 64)).astype(np.float32)
    out = c.attention(0, [s], q, softmax_scale=0.2)
    ref = attention_reference(k, v, q[0], scale=0.2)
    np.testing.assert_allclose(out[0], ref, atol=2e-5, rtol=1e-4)


def test_oscar_attention_error_shrinks_with_bits(rng):
    """Against attention over the original K/V, 4-bit is much closer than 2-bit,
    and 2-bit is still far from noise (on unstructured Gaussian K/V, the worst case)."""
    k, v = kv(rng, 200)
    q = rng.standard_normal((1, 1, 4, 64)).astype(np.float32)
    ref = attention_reference(k, v, q[0])
    errs = {}
    for bits in (2, 4):
        c = oscar.OscarPool(small_config(method="oscar", bits=bits, window_dtype="f32"))
        s = c.add_seq()
        c.append(0, [s], [200], k, v)
        out = c.attention(0, [s], q)[0]
        errs[bits] = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert 0 < errs[4] < 0.5 * errs[2] and errs[2] < 0.8, errs


def test_incremental_append_equals_prefill(rng):
    """A token gives the same block whether it arrived in a prefill or one by one."""
    a = oscar.OscarPool(small_config(window_dtype="f16"))
    b = oscar.OscarPool(small_config(window_dtype="f16"))
    sa, sb = a.add_seq(), b.add_seq()
    k, v = kv(rng, 75)
    a.append(0, [sa], [75], k, v)
    for i in range(0, 75, 7):
        b.append(0, [sb], None, k[i:i + 7], v[i:i + 7])
    for x, y in zip(a.read(sa, 0), b.read(sb, 0)):
        np.testing.assert_array_equal(x, y)
    q = rng.standard_normal((1, 1, 4, 64)).astype(np.float32)
    np.testing.assert_array_equal(a.attention(0, [sa], q), b.attention(0, [sb], q))


def test_f16_and_bf16_inputs_and_outputs(rng):
    c = oscar.OscarPool(small_config(window_dtype="bf16"))
    s = c.add_seq()
    k, v = kv(rng, 40)
    c.append(0, [s], [40], k.astype(np.float16), v.astype(np.float16))
    q = rng.standard_normal((1, 1, 4, 64)).astype(np.float32)
    ref = c.attention(0, [s], q)
    o16 = c.attention(0, [s], q.astype(np.float16))
    assert o16.dtype == np.float16
    np.testing.assert_allclose(o16.astype(np.float32), ref, atol=2e-2)
    o = c.attention(0, [s], q, out_dtype="f16")
    assert o.dtype == np.float16
    bf = _tensor.numpy_bf16()
    if bf is None:
        with pytest.raises(oscar.DTypeError):
            c.attention(0, [s], q, out_dtype="bf16")
        return
    ob = c.attention(0, [s], q.astype(bf))
    assert ob.dtype == bf
    np.testing.assert_allclose(ob.astype(np.float32), ref, atol=5e-2)
    c.append(0, [s], [3], k[:3].astype(bf), v[:3].astype(bf))
    assert c.info(s, 0).tokens == 43


def test_gqa_head_mapping(rng):
    """Query head j reads KV head j // (Hq/Hkv): queries equal within a group give equal outputs."""
    c = oscar.OscarPool(small_config(num_q_heads=8, num_kv_heads=2))
    s = c.add_seq()
    k, v = kv(rng, 40)
    c.append(0, [s], [40], k, v)
    q = np.repeat(rng.standard_normal((1, 1, 1, 64)).astype(np.float32), 8, axis=2)
    out = c.attention(0, [s], q)[0, 0]
    np.testing.assert_allclose(out[:4], np.broadcast_to(out[0], (4, 64)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[4:], np.broadcast_to(out[4], (4, 64)), rtol=1e-6, atol=1e-6)
    assert np.abs(out[0] - out[4]).max() > 1e-3


# ---- the paged API ------------------------------------------------------------------------

def test_block_tables_fork_free_and_memory(rng):
    c = oscar.OscarPool(small_config(block_count=16, max_seqs=4))
    m0 = c.memory()
    assert m0.blocks_total == 16 and m0.blocks_free == 16 and m0.blocks_used == 0
    assert m0.seqs_live == 0 and m0.seqs_max == 4 and m0.pool_bytes == 16 * m0.block_bytes
    assert m0.fp16_bytes_per_token == 2 * 2 * 2 * 64 * 2
    assert m0.compression_vs_fp16 > 4
    assert set(m0.as_dict()) >= {"block_bytes", "bytes_in_use", "packed_bytes_per_token"}
    a = c.add_seq()
    k, v = kv(rng, 100)
    for layer in range(2):
        c.append(layer, [a], [100], k, v)
    info = c.info(a, 1)
    assert (info.tokens, info.packed_tokens, info.window_tokens, info.blocks) == (100, 96, 4, 3)
    ta = c.block_table(a)
    assert ta.dtype == np.int32 and len(ta) == 3 and len(set(ta.tolist())) == 3
    assert all(0 <= b < 16 for b in ta)
    m = c.memory()
    assert (m.blocks_used, m.blocks_free, m.seqs_live) == (3, 13, 1)
    assert m.bytes_in_use >= 3 * m.block_bytes
    # fork shares the packed blocks and copies the window
    f = c.fork(a)
    np.testing.assert_array_equal(c.block_table(f), ta)
    assert c.memory().blocks_used == 3 and c.memory().seqs_live == 2
    for x, y in zip(c.read(a, 0), c.read(f, 0)):
        np.testing.assert_array_equal(x, y)
    # the fork diverges: its next block is its own
    k2, v2 = kv(rng, 30)
    for layer in range(2):
        c.append(layer, [f], [30], k2, v2)
    tf = c.block_table(f)
    assert len(tf) == 4 and list(tf[:3]) == list(ta) and tf[3] not in ta
    np.testing.assert_array_equal(c.block_table(a), ta)
    assert c.info(a, 0).tokens == 100 and c.info(f, 0).tokens == 130
    assert c.memory().blocks_used == 4
    # padded table matrix, vLLM style
    bt = c.block_tables([a, f])
    assert bt.shape == (2, 4) and bt.dtype == np.int32
    assert list(bt[0]) == list(ta) + [-1] and list(bt[1]) == list(tf)
    out = np.full((2, 6), 99, np.int32)
    assert c.block_tables([a, f], pad=-7, out=out) is out
    assert list(out[0]) == list(ta) + [-7, -7, -7]
    row = np.full(8, -1, np.int32)
    assert c.block_table(f, out=row) == 4 and list(row[:4]) == list(tf) and row[4] == -1
    with pytest.raises(oscar.ShapeError):
        c.block_table(f, out=np.zeros(2, np.int32))
    with pytest.raises(oscar.DTypeError):
        c.block_table(f, out=np.zeros(8, np.int64))
    # free: shared blocks stay until the last user is gone
    c.free(a)
    assert c.memory().blocks_used == 4 and a not in c.seqs
    with pytest.raises(oscar.NotFoundError):
        c.block_table(a)
    c.free(f)
    m = c.memory()
    assert (m.blocks_used, m.blocks_free, m.seqs_live) == (0, 16, 0)
    assert c.seqs == []


def test_batch_append_with_zero_tokens_and_layers_independent(rng):
    c = oscar.OscarPool(small_config())
    ids = c.add_seqs(3)
    k, v = kv(rng, 45)
    c.append(1, ids, [40, 0, 5], k, v)
    assert [c.info(s, 1).tokens for s in ids] == [40, 0, 5]
    assert [c.info(s, 0).tokens for s in ids] == [0, 0, 0]
    kd, _ = c.read(ids[2], 1)
    kr, _ = c.read(ids[0], 1, 0, 40)
    # rows were split per sequence in order
    assert np.abs(kd - k[40:]).max() < 1e-2
    assert np.abs(kr[32:] - k[32:40]).max() < 1e-2


def test_export_import_round_trip(rng):
    cfg = small_config()
    a = oscar.OscarPool(cfg)
    b = oscar.OscarPool(cfg)
    s = a.add_seq()
    for layer in range(2):
        k, v = kv(rng, 77)
        a.append(layer, [s], [77], k, v)
    blob = a.export_seq(s)
    assert isinstance(blob, bytes) and blob[:8] == b"OSCARSEQ"
    t = b.import_seq(blob)
    t2 = b.import_seq(bytearray(blob))
    for layer in range(2):
        assert b.info(t, layer) == a.info(s, layer)
        for x, y in zip(a.read(s, layer), b.read(t, layer)):
            np.testing.assert_array_equal(x, y)
    q = rng.standard_normal((1, 1, 4, 64)).astype(np.float32)
    np.testing.assert_array_equal(a.attention(1, [s], q), b.attention(1, [t2], q))
    with pytest.raises(oscar.FormatError):
        b.import_seq(b"garbage" * 10)
    bad = bytearray(blob)
    bad[8] ^= 0xFF                              # format version
    with pytest.raises(oscar.FormatError):
        b.import_seq(bytes(bad))
    with pytest.raises(oscar.FormatError):
        b.import_seq(blob[: len(blob) // 2])    # truncated
    bad = bytearray(blob)
    bad[len(blob) // 2] ^= 0x01                 # one payload bit: the checksum catches it
    with pytest.raises(oscar.FormatError):
        b.import_seq(bytes(bad))
    assert b.memory().seqs_live == 2
    other = oscar.OscarPool(small_config(residual=64))
    with pytest.raises(oscar.FormatError):
        other.import_seq(blob)                  # different R
    assert other.memory().seqs_live == 0


def test_config_round_trip_and_defaults():
    d = oscar.OscarConfig()
    assert d.method == "oscar" and d.bits == 2 and d.head_dim == 128 and d.window_dtype == "f16"
    assert d.residual == 128 and d.backend == "cpu"
    c = oscar.OscarPool(small_config(method="kivi", bits=4, window_dtype=np.float32))
    cfg = c.config
    assert (cfg.method, cfg.bits, cfg.window_dtype, cfg.head_dim, cfg.residual) == ("kivi", 4, "f32", 64, 32)
    assert c.device == "cpu" and c.num_layers == 2 and "kivi" in repr(c)
    bits = small_config().packed_bits()
    assert 2.0 < bits < 3.5
    with oscar.OscarPool(small_config()) as cc:
        assert not cc.closed
    assert cc.closed


# ---- helpers ------------------------------------------------------------------------------------

def test_hadamard_helper(rng):
    n = 64
    H = np.array([[(-1) ** bin(i & j).count("1") for j in range(n)] for i in range(n)]) / np.sqrt(n)
    x = rng.standard_normal((3, n)).astype(np.float32)
    y = x.copy()
    assert oscar.hadamard(y) is y
    np.testing.assert_allclose(y, x @ H.T, atol=1e-5)
    oscar.hadamard(y)
    np.testing.assert_allclose(y, x, atol=1e-5)
    with pytest.raises(oscar.InvalidArgumentError):
        oscar.hadamard(np.zeros((2, 48), np.float32))
    with pytest.raises(oscar.DTypeError):
        oscar.hadamard(np.zeros((2, 64), np.float64))


def test_folded_values_match_online_rotation(rng):
    """Offline fold (rotate_values=0, V arrives rotated, output in rotated space) == online."""
    on = oscar.OscarPool(small_config(rotate_values=1, window_dtype="f32"))
    off = oscar.OscarPool(small_config(rotate_values=0, window_dtype="f32"))
    s1, s2 = on.add_seq(), off.add_seq()
    k, v = kv(rng, 50)
    vr = v.copy()
    oscar.hadamard(vr)
    on.append(0, [s1], [50], k, v)
    off.append(0, [s2], [50], k, vr)
    q = rng.standard_normal((1, 1, 4, 64)).astype(np.float32)
    o1 = on.attention(0, [s1], q)
    o2 = off.attention(0, [s2], q)
    oscar.hadamard(o2)          # back to the original space
    np.testing.assert_allclose(o1, o2, atol=1e-3)
