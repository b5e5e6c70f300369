"""Benchmark scripts on tiny shapes, so they do not rot between the runs that fill BENCHMARKS.md and QUALITY.md:
bench/gpu_throughput.py on CPU (an H100 session runs it) and bench/moe_vs_dense.py end to end."""

import os
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


def test_moe_vs_dense_trains_each_variant_and_writes_its_table_and_plot(tmp_path):
    # the offline corpus, prepared by the command itself; 4 steps of the quick shape per variant
    command = [sys.executable, str(REPO_ROOT / "bench" / "moe_vs_dense.py"), "--shape", "quick"]
    command += ["--variants", "dense,top2-bias", "--output_dir", tmp_path / "compare"]
    environment = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "compare" / "moe_vs_dense.md").read_text()
    rows = {row.split("|")[1].strip(): row.split("|")[2:-1] for row in report.splitlines() if row.startswith("| ")}
    assert list(rows) == ["variant", "dense", "top2-bias"]
    dense, moe = rows["dense"], rows["top2-bias"]
    assert dense[1:3] == [" - ", " 1.00 "] and dense[4].strip() == "1.00x" and dense[5:] == [" - ", " 0 "]
    assert float(moe[0]) > 0 and moe[5].count("/") == 1  # max/mean of its 2 layers
    # its pass-by-pass difference to dense: the first pass is each run's logged final loss, so the mean differs
    # from the difference of the logged losses only by the other passes
    mean, spread = (float(part) for part in moe[1].split("±"))
    assert spread >= 0 and abs(mean) < 3 and mean != 0
    for name in ("dense", "top2-bias"):
        log = (tmp_path / "compare" / name / "log.txt").read_text().splitlines()
        assert [line.split()[0] for line in log if " val " in line] == ["0", "2", "4"]
        assert f"| {name} | {float(log[-1].split()[2]):.4f} |" in report  # the final val loss of its own log
    # the noise passes read the validation split as training does: the first is the logged final loss
    first_pass = float(re.search(r"disjoint validation passes .*\(values ([\d.]+),", report).group(1))
    assert abs(first_pass - float(rows["dense"][0])) < 1e-3, report
    assert (tmp_path / "compare" / "moe_vs_dense.png").stat().st_size > 0
    assert "training top2-bias" in result.stdout

    # again with a Muon twin: the finished runs are kept, the new one trains, its row compares it with its AdamW twin
    command[command.index("--variants") + 1] = "dense,top2-bias,dense+muon"
    again = subprocess.run([*command, "--reuse_runs"], cwd=tmp_path, capture_output=True, text=True, env=environment)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "dense: reusing" in again.stdout and "top2-bias: reusing" in again.stdout
    assert "dense+muon: reusing" not in again.stdout
    report = (tmp_path / "compare" / "moe_vs_dense.md").read_text()
    muon_rows = [row for row in report.splitlines() if row.startswith("| dense+muon |") and row.count("|") == 7]
    assert len(muon_rows) == 1, report  # its row of the Muon-against-AdamW table
    muon_row = muon_rows[0]
    assert f"| {float(rows['dense'][0]):.4f} |" in muon_row and muon_row.split("|")[-2].strip().endswith("x")


def test_moe_vs_dense_rejects_an_unknown_variant_in_one_line(tmp_path):
    command = [sys.executable, str(REPO_ROOT / "bench" / "moe_vs_dense.py"), "--variants", "dense,top3"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 1 and "top3" in result.stderr and len(result.stderr.splitlines()) == 1
