"""benchmarks/quality.py runs on a tiny replica and reports every field for every configuration."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "quality.py"


def test_quality_benchmark_reports_its_fields(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--samples", "2", "--heldout", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [(r["method"], r["bits"], r["group_size"]) for r in rows] == [
        ("rtn", 4, 32), ("gptq", 4, 32), ("rtn", 4, 128), ("gptq", 4, 128)]
    for r in rows:
        assert 0 <= r["top1_agreement"] <= 1 and r["mean_kl"] >= 0 and r["positions"] > 0
        assert r["export_seconds"] > 0
    header = "method   bits  group  top1 agree   mean KL  positions  export s"
    assert header in proc.stdout and len(proc.stdout.strip().splitlines()) == 6
