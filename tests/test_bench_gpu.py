"""scripts/bench_gpu.sh without a GPU: it skips cleanly (exit 0, a JSON that says why), so the same command can
run unchanged on any machine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs the benchmarks (minutes)")
@pytest.mark.parametrize("where", ["argument", "OUT", "cwd"])
def test_bench_gpu_skips_without_cuda(tmp_path, where):
    env = {k: v for k, v in os.environ.items() if k != "OUT"} | {"PYTHON": sys.executable}
    args = ["bash", str(SCRIPT)]
    expected = tmp_path / "bench_gpu.json"
    if where == "argument":
        expected = tmp_path / "sub" / "gpu.json"
        args.append(str(expected))
    elif where == "OUT":
        env["OUT"] = str(tmp_path / "out")
        expected = tmp_path / "out" / "bench_gpu.json"
    proc = subprocess.run(args, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "skipped" in proc.stdout
    result = json.loads(expected.read_text())
    assert set(result) == {"skipped"} and "CUDA" in result["skipped"]
