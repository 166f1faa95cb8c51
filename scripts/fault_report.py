"""Fault report: run the fault-injection suites and print one table of cases tried, survived and data lost.

    python scripts/fault_report.py            # from the repository root, in the project's environment

A case survives when its test passes: the run resumed exactly, or the input was refused with a clear
error (or skipped and counted, as documented). Data lost counts the earlier results (checkpoints,
output directories) that a fault destroyed or changed; it must be 0. The exit status is 0 only if
every case survived and nothing was lost.
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITES = {  # test file -> what it injects
    "tests/test_resume.py": "SIGKILL mid-run / mid-checkpoint, then resume",
    "tests/test_preemption.py": "SIGKILL early, SIGTERM/INT, 2 signals, lock, DDP",
    "tests/test_preemption_online.py": "SIGTERM/SIGKILL on SmolLM2; vLLM resume",
    "tests/test_checkpoints.py": "corrupt or partial checkpoints, failed saves",
    "tests/test_bad_input.py": "malformed data, configs, models (+ fuzz)",
    "tests/test_numerical_faults.py": "NaN/inf loss and gradients, failing rewards",
    "tests/test_sandbox.py": "malicious generated code",
    "tests/test_security.py": "forged code rewards, remote code, pickles, paths",
}


class Tally:
    """pytest plugin: per suite, the cases tried and survived and the data lost (``record_property``)."""

    def __init__(self):
        self.rows = defaultdict(lambda: {"tried": 0, "survived": 0, "lost": 0, "seconds": 0.0})

    def pytest_runtest_logreport(self, report):
        row = self.rows[report.nodeid.split("::")[0]]
        row["seconds"] += report.duration  # set-up (fixtures: trained runs, processes) included
        if report.skipped or (report.when != "call" and report.passed):
            return  # skipped cases are not tried; a set-up or teardown that passed is not a case
        props = dict(report.user_properties)
        cases = props.get("cases", 1)
        row["tried"] += cases
        row["survived"] += cases if report.passed else 0
        row["lost"] += props.get("data_lost", 0)


def main() -> int:
    import pytest

    os.chdir(ROOT)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("ALIGN_CACHE", str(ROOT / ".cache" / "align"))
    tally = Tally()
    start = time.monotonic()
    status = pytest.main([*SUITES, "-q", "-p", "no:cacheprovider", "-W", "ignore"], plugins=[tally])
    header = f"{'suite':32s} {'faults injected':48s} {'tried':>6s} {'survived':>9s} {'data lost':>10s} {'time':>7s}"
    print("\n" + header + "\n" + "-" * len(header))
    total = {"tried": 0, "survived": 0, "lost": 0}
    for suite, what in SUITES.items():
        row = tally.rows[suite]
        print(f"{suite:32s} {what:48s} {row['tried']:6d} {row['survived']:9d} {row['lost']:10d} {row['seconds']:6.0f}s")
        for key in total:
            total[key] += row[key]
    print("-" * len(header))
    print(f"{'total':81s} {total['tried']:6d} {total['survived']:9d} {total['lost']:10d} "
          f"{time.monotonic() - start:6.0f}s")
    ok = status == 0 and total["lost"] == 0 and total["survived"] == total["tried"]
    print("all faults survived, no data lost" if ok else "FAULTS NOT SURVIVED or DATA LOST: see above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
