#!/usr/bin/env bash
# python/tests/test_hf.py against the oldest transformers oscar.hf supports
# (5.17, python/pyproject.toml), which .ci/run installs into
# build-pydeps/transformers-oldest beside the newest one. Skips (exit 77) with a
# message when that directory is missing.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=$here/build-pydeps/transformers-oldest
if [ ! -d "$dir/transformers" ]; then
    echo "cli_python_hf_oldest: SKIP: $dir is missing (.ci/run installs transformers 5.17 there)"
    exit 77
fi
export PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}"
echo "cli_python_hf_oldest: transformers $(${PYTHON:-python3} -c 'import transformers; print(transformers.__version__)' 2>&1 | tail -1) from $dir"
OSCAR_PYTEST_FILES="python/tests/test_hf.py" exec bash "$here/tests/cli_python.sh" "$@"
