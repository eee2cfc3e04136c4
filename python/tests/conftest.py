"""pytest setup for the oscar binding.

The package is imported from this checkout (python/), never from an installed
copy. liboscar.so is found the usual way (OSCAR_LIBRARY, else ../build).
GPU tests carry the `gpu` marker and "gpu" in their names:
    python3 -m pytest -q python/tests -k gpu
"""

import os
import sys

import pytest

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if PYTHON_DIR not in sys.path:
    sys.path.insert(0, PYTHON_DIR)

np = pytest.importorskip("numpy", reason="numpy is not installed: the oscar binding tests need it")

# torch before liboscar.so: a CUDA build of the library needs libcudart.so.13, and
# whichever copy is loaded first serves the whole process. torch's own (from its
# nvidia-* wheels) may be newer than the toolkit's the library was linked with; the
# library runs on the newer one, torch may not run on the older one.
try:
    import torch  # noqa: F401
except Exception:
    pass


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs torch with CUDA and liboscar's CUDA backend")
    config.addinivalue_line("markers", "hf: needs torch and transformers")


def torch_or_none():
    try:
        import torch  # noqa: F401
        return torch
    except Exception:
        return None


def cuda_ready():
    """(ok, reason) for the GPU tests."""
    import oscar
    torch = torch_or_none()
    if torch is None:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    if not oscar.backend_available("cuda"):
        return False, "liboscar.so was built without the CUDA backend (or sees no device)"
    return True, ""


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def small_config(**kw):
    import oscar
    base = dict(head_dim=64, num_kv_heads=2, num_q_heads=4, num_layers=2, residual=32,
                k_group=32, v_group=32, block_count=64, max_seqs=8, num_threads=2)
    base.update(kw)
    return oscar.OscarConfig(**base)


def attention_reference(k, v, q, scale=None):
    """float64 attention. k, v: [T, Hkv, d]; q: [q_len, Hq, d]; causal among
    the q_len last tokens. Returns [q_len, Hq, d] float64."""
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    T, hkv, d = k.shape
    q_len, hq, _ = q.shape
    g = hq // hkv
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    out = np.empty((q_len, hq, d))
    for i in range(q_len):
        n = T - q_len + i + 1
        for j in range(hq):
            h = j // g
            logits = k[:n, h, :] @ q[i, j] * scale
            p = np.exp(logits - logits.max())
            p /= p.sum()
            out[i, j] = p @ v[:n, h, :]
    return out


def assert_matches_reference(out, ref, tol, what=""):
    """max |out - ref| <= tol * max(1, max |ref|), with a short message."""
    out = np.asarray(out, dtype=np.float64)
    err = float(np.abs(out - ref).max())
    bound = tol * max(1.0, float(np.abs(ref).max()))
    assert err <= bound, "%s: max error %.3g > %.3g" % (what, err, bound)


def import_or_skip(name, what):
    """The module, or a skip (with the reason) if it is missing or fails to import."""
    import importlib
    try:
        return importlib.import_module(name)
    except Exception as e:  # a broken install must skip, not break collection
        pytest.skip("%s: %s skipped (%s: %s)" % (name, what, type(e).__name__, e),
                    allow_module_level=True)
