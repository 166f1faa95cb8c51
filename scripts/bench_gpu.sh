#!/usr/bin/env bash
# The GPU benchmarks in one go (< 8 minutes on one GPU), one JSON out:
#   bash scripts/bench_gpu.sh [OUTPUT.json]     # default: $OUT/bench_gpu.json when $OUT is set, else ./bench_gpu.json
# 1. scripts/bench_train.py in bf16 mixed precision: align's trainers against TRL's, both shapes (SmolLM2 skipped
#    when not installed);
# 2. scripts/bench_sampling.py in bf16: HF generate against vLLM, weight sync merged against adapter-only;
# 3. scripts/bench_decoding.py: align's contrastive search against greedy (and transformers 4.55's, where its
#    environment exists: --tf4-python).
# Each part has a time limit of its own (below) and writes its --json; the output merges them under
# "bench_train", "bench_sampling", "bench_decoding" (a part that failed or ran out of time: {"error", "log_tail"}).
# Without a CUDA device (torch.cuda.is_available() false) it writes {"skipped": why} and exits 0.
# PYTHON (default: python) is the interpreter; the exit status is 1 when a part failed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEFAULT_DIR="${OUT:-.}"
OUTPUT="${1:-$DEFAULT_DIR/bench_gpu.json}"
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$(dirname "$OUTPUT")"
OUTPUT="$(cd "$(dirname "$OUTPUT")" && pwd)/$(basename "$OUTPUT")"  # absolute: the parts run from the root

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    reason="no CUDA device (torch.cuda.is_available() is false, or torch does not import)"
    echo "bench_gpu: skipped: $reason"
    printf '{"skipped": "%s"}\n' "$reason" >"$OUTPUT"
    exit 0
fi

PARTS="$(mktemp -d)"
trap 'rm -rf "$PARTS"' EXIT
START=$SECONDS
# part name, time limit (s), command: 270 + 150 + 60 s = 8 min at most, ~1 min of it vLLM's start
run_part() {
    local name=$1 limit=$2
    shift 2
    echo "bench_gpu: $name (at most $limit s): $*"
    timeout "$limit" "$@" --json "$PARTS/$name.json" >"$PARTS/$name.log" 2>&1
    echo $? >"$PARTS/$name.rc"
    tail -n 25 "$PARTS/$name.log"
}
cd "$ROOT"
run_part bench_train 270 "$PY" scripts/bench_train.py --device cuda --dtype bfloat16
run_part bench_sampling 150 "$PY" scripts/bench_sampling.py --device cuda --dtype bfloat16
run_part bench_decoding 60 "$PY" scripts/bench_decoding.py --device cuda --shape readme llama38m smollm2

"$PY" - "$PARTS" "$OUTPUT" "$((SECONDS - START))" <<'EOF'
import json, sys
from pathlib import Path

import torch

parts, output, wall = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
merged = {"device": device, "torch": torch.__version__, "wall_s": wall}
failed = []
for name in ("bench_train", "bench_sampling", "bench_decoding"):
    rc = int((parts / f"{name}.rc").read_text())
    result = parts / f"{name}.json"
    if rc == 0 and result.exists():
        merged[name] = json.loads(result.read_text())
    else:
        failed.append(name)
        why = "timed out" if rc == 124 else f"exit status {rc}"
        merged[name] = {"error": why, "log_tail": (parts / f"{name}.log").read_text()[-3000:]}
Path(output).write_text(json.dumps(merged, indent=2) + "\n")
print(f"bench_gpu: {wall} s, wrote {output}" + (f"; failed: {', '.join(failed)}" if failed else ""))
sys.exit(1 if failed else 0)
EOF
