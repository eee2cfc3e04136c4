#!/usr/bin/env bash
# oscar.hf against transformers' DynamicCache (python/tests/test_hf.py), run by
# ctest as its own test (the whole Python suite would outlast one test's timeout).
# Skips (exit 77) as cli_python.sh does; without torch/transformers pytest skips.
OSCAR_PYTEST_FILES="python/tests/test_hf.py" exec bash "$(dirname "${BASH_SOURCE[0]}")/cli_python.sh" "$@"
