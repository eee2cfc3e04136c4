#!/usr/bin/env bash
# torch.compile of oscar.hf decode steps on the CPU (python/tests/test_compile.py)
# and the wheel build/install/import test (python/tests/test_wheel.py), run by
# ctest as their own test. Skips (exit 77) as cli_python.sh does.
OSCAR_PYTEST_FILES="python/tests/test_compile.py python/tests/test_wheel.py" \
    exec bash "$(dirname "${BASH_SOURCE[0]}")/cli_python.sh" "$@"
