"""benchmarks/asr_efficiency.py's table: means, seed spread and the CER ratio
from hand-made runs, also when only one arm has trained (`--arms scratch`)."""

import json
import subprocess
import sys

from helpers import ROOT

_SCRIPT = r"""
import importlib.util, json, os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "benchmarks"))
spec = importlib.util.spec_from_file_location("asr_eff", os.path.join(sys.argv[1], "benchmarks", "asr_efficiency.py"))
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
runs = json.loads(sys.argv[2])
meta = dict(seeds=[0, 1], num_test=60, test_speakers=["en-us+m3"], pretrain_seconds=0.0,
            finetune_seconds=60.0, total_seconds=120.0, load_start="x", load_end="y")
print(m.table(runs, [2.0, 10.0], meta))
"""


def _run(arm, m, cer, wer, minutes):
    return {"arm": arm, "minutes_asked": m, "train_minutes": minutes,
            "metrics": {"cer": cer, "wer": wer}}


def test_table_means_spread_ratio_and_a_missing_arm():
    runs = [_run("scratch", 2.0, 0.5, 0.9, 2.1), _run("scratch", 2.0, 0.7, 1.0, 1.9),
            _run("pretrained", 10.0, 0.2, 0.6, 10.0), _run("scratch", 10.0, 0.4, 0.8, 10.0)]
    out = subprocess.run([sys.executable, "-c", _SCRIPT, ROOT, json.dumps(runs)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith(("| 2", "| 10"))]
    # scratch at 2 min: mean 0.6, sample sd of (0.5, 0.7) = 0.1414; no pretrained run.
    assert rows[0] == ("| 2 min (2.0 min, n=2) | - | 0.600 +- 0.141 | nan | - | "
                       "0.950 +- 0.071 |")
    assert rows[1] == "| 10 min (10.0 min, n=1) | 0.200 | 0.400 | 0.50 | 0.600 | 0.800 |"
