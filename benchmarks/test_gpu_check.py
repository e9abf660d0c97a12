"""benchmarks/gpu_check.py in its CPU dry run: every section at tiny sizes (the tests only collected,
no build), so a run on a GPU machine does not spend its minutes on a typo. Runs in the untimed smoke
run."""
import os
import subprocess
import sys

SECTIONS = ("environment", "build", "tests", "lif", "stars", "synthesis")


def test_gpu_check_cpu_dry_run(tmp_path):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_check.py")
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    done = subprocess.run([sys.executable, script, "--cpu-dry-run", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    log = done.stdout[-4000:] + done.stderr[-4000:]
    table = (tmp_path / "gpu_check.md").read_text()
    assert done.returncode == 0, log
    for section in SECTIONS:
        assert f"| {section} |" in table, f"section {section} missing from the table:\n{table}"
    assert "| FAIL |" not in table, table
    for row in ("copy_ (bandwidth)", "fwd+bwd fused-cpu", "fwd+bwd spikingjelly", "GEMMs alone",
                "fwd+bwd gram-eager", "reference / fused, STARS on", "fused-cuda, not timed here"):
        assert row in table, f"no {row!r} row:\n{table}"
