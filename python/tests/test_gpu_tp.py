"""Tensor parallelism on two GPUs: torchrun --nproc-per-node 2 runs
python/bench/tp_qwen3.py (transformers tp_plan="auto", a Qwen3-shaped model,
each rank half the KV heads, key norms all-gathered through torch.distributed)
and compares its logits with one GPU holding every head. Skipped with a
message without two GPUs."""

import os
import subprocess
import sys

import pytest

from conftest import PYTHON_DIR, cuda_ready, import_or_skip

torch = import_or_skip("torch", "tensor-parallel test")
import_or_skip("transformers", "tensor-parallel test")

_ok, _why = cuda_ready()
if not _ok:
    pytest.skip("GPU test skipped: " + _why, allow_module_level=True)
if torch.cuda.device_count() < 2:
    pytest.skip("GPU test skipped: tensor parallelism needs 2 GPUs, this machine has %d"
                % torch.cuda.device_count(), allow_module_level=True)

pytestmark = [pytest.mark.gpu]


def run_tp(tmp_path, *extra):
    import oscar
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
               OSCAR_LIBRARY=oscar.library_path,
               PYTHONPATH=PYTHON_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = os.path.join(PYTHON_DIR, "bench", "tp_qwen3.py")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", script,
                           "--workdir", str(tmp_path), "--check", *extra], env=env, capture_output=True,
                          text=True, timeout=900)


def test_gpu_tp2_matches_one_gpu(tmp_path):
    r = run_tp(tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "TP CHECK OK" in r.stdout, r.stdout[-4000:]


def test_gpu_tp2_check_catches_local_norms(tmp_path):
    """The check can fail: norms over each rank's own heads (no all-gather) must be caught."""
    r = run_tp(tmp_path, "--mutate-local-norms")
    assert "TP CHECK FAILED" in r.stdout, r.stdout[-4000:] + r.stderr[-4000:]
    assert r.returncode != 0
