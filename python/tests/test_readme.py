"""The README's "Use from Python" example runs as written (python/README.md,
and the main README.md once the section is merged there)."""

import os
import re
import subprocess
import sys

import pytest

import oscar
from conftest import PYTHON_DIR, import_or_skip

ROOT = os.path.dirname(PYTHON_DIR)


def python_blocks(path, heading):
    text = open(path, encoding="utf-8").read()
    m = re.search(r"^(#+) %s\s*$" % re.escape(heading), text, re.M)
    if not m:
        return None
    level = len(m.group(1))
    rest = text[m.end():]
    end = re.search(r"^#{1,%d} " % level, rest, re.M)
    section = rest[: end.start()] if end else rest
    return re.findall(r"```python\n(.*?)```", section, re.S)


def run_example(code, tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = PYTHON_DIR + os.pathsep + env.get("PYTHONPATH", "")
    env["OSCAR_LIBRARY"] = oscar.library_path
    script = tmp_path / "example.py"
    script.write_text(code)
    r = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.parametrize("readme", ["python/README.md", "README.md"])
def test_use_from_python_example_runs(readme, tmp_path):
    path = os.path.join(ROOT, readme)
    if not os.path.exists(path):
        pytest.skip("%s does not exist" % readme)
    blocks = python_blocks(path, "Use from Python")
    if blocks is None:
        pytest.skip("%s has no 'Use from Python' section yet" % readme)
    assert blocks, "no python code block in the section"
    code = blocks[0]
    assert len(code.strip().splitlines()) <= 10, "the example should be 10 lines"
    out = run_example(code, tmp_path)
    assert "tokens=100" in out and "packed_tokens=96" in out and "(1, 1, 4, 64)" in out, out
    assert "smaller than an fp16 cache" in out


def test_hugging_face_examples_run(tmp_path):
    """The first three blocks (basic generate, a padded batch, assisted decoding) run on
    the CPU as written; the compiled-generation block needs a GPU and a checkpoint and is
    covered by test_gpu_compile.py."""
    import_or_skip("torch", "the Hugging Face README examples")
    import_or_skip("transformers", "the Hugging Face README examples")
    blocks = python_blocks(os.path.join(PYTHON_DIR, "README.md"), "Hugging Face transformers")
    assert blocks and len(blocks) >= 4
    out = run_example(blocks[0], tmp_path)
    assert "torch.Size([1, 44])" in out and "bytes per block of 2-bit KV" in out, out
    out = run_example(blocks[1], tmp_path)
    assert "torch.Size([2, 16]) [12, 15]" in out, out
    out = run_example(blocks[2], tmp_path)
    assert "torch.Size([1, 54]) [53]" in out, out
    assert "from_pretrained" in blocks[3] and "torch.compile" in blocks[3]
