"""bench/gpu_throughput.py on CPU with its tiny shape: the script an H100 session runs must not rot between runs."""

import re
import subprocess
import sys

from conftest import REPO_ROOT

SCRIPT = str(REPO_ROOT / "bench" / "gpu_throughput.py")
# the 8x top-2 MoE's variants: both experts implementations, and one compiled model
QUICK_MOE = [SCRIPT, "--quick", "--device", "cpu", "--only", "8x top-2"]


def test_gpu_throughput_writes_a_row_per_variant(tmp_path):
    table = tmp_path / "throughput.md"
    result = subprocess.run(
        [sys.executable, *QUICK_MOE, "--output", table], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in table.read_text().splitlines() if line.startswith("| MoE")]
    names = [row[0].strip() for row in rows]
    assert names == [
        "MoE 8x top-2, experts eager",
        "MoE 8x top-2, experts grouped_mm",
        "MoE 8x top-2, experts grouped_mm, compiled",
    ]
    tokens_per_second = [float(row[2].replace(",", "")) for row in rows]
    assert all(rate > 0 for rate in tokens_per_second), rows
    assert table.read_text().rstrip().endswith("2 of 2 timed rounds of 1 steps")
    assert "first call" in result.stdout and "timed round 2/2 done" in result.stdout


def test_gpu_throughput_rejects_an_unwritable_output_in_one_line(tmp_path):
    missing_folder = tmp_path / "no_such_folder" / "throughput.md"
    result = subprocess.run(
        [sys.executable, *QUICK_MOE, "--output", missing_folder], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert re.fullmatch(r"error: cannot write --output .*no_such_folder.*\n", result.stderr), result.stderr
    assert "first call" not in result.stdout  # it stopped before compiling anything
