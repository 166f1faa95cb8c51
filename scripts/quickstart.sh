#!/usr/bin/env bash
# Installs align and runs the built-in offline demo (CPL on a small local policy; nothing downloaded).
# Extra arguments are passed to `align train`, e.g. --output_dir runs/mine --seed 1
source "$(dirname "$0")/_env.sh"
pip_install -e .
align train --config configs/quickstart.yaml "$@"
