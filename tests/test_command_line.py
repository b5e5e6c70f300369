"""Every command-line tool reports a mistake in its flags as one line and exit status 1, never a traceback.

In-process, through each tool's main() with sys.argv set (train_accelerate.py is also run as a process in
test_train.py)."""

import importlib.util
from pathlib import Path

import pytest
from conftest import REPO_ROOT

# each tool: the arguments it requires, and a flag given a value it refuses
TOOLS = {
    "train_accelerate.py": ([], ["--max_steps", "many"]),
    "prepare_fineweb.py": ([], ["--num_proc", "many"]),
    "hellaswag.py": (["--model", "gpt2"], ["--limit", "0"]),
    "sample.py": (["checkpoint"], ["--seed", "many"]),
    "convert_gpt2_to_gpt_moe.py": (["--gpt2", "gpt2", "--output_dir", "out"], ["--seed", "many"]),
    "bench/bench_data.py": ([], ["--quick=yes"]),
    "bench/bench_model_cpu.py": ([], ["--only", "everything"]),
    "bench/bench_moe_cpu.py": ([], ["--only", "everything"]),
    "bench/gpu_model_check.py": ([], ["--batch_size", "many"]),
    "bench/gpu_throughput.py": ([], ["--precision", "fp8"]),
}
UNKNOWN_FLAG = ["--no_such_flag", "3"]


def load_tool(path: str):
    spec = importlib.util.spec_from_file_location(f"tool_{Path(path).stem}", REPO_ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mistake", ["unknown flag", "bad value"])
@pytest.mark.parametrize("tool", TOOLS)
def test_a_mistake_in_the_flags_is_one_line(tool, mistake, monkeypatch, capsys):
    required, bad_value = TOOLS[tool]
    flags = UNKNOWN_FLAG if mistake == "unknown flag" else bad_value
    monkeypatch.setattr("sys.argv", [Path(tool).name, *required, *flags])
    monkeypatch.syspath_prepend(str((REPO_ROOT / tool).parent))  # as when run: its folder first (bench/timing.py)
    try:
        returncode = load_tool(tool).main()
    except SystemExit as exit:
        returncode = exit.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert returncode == 1 and len(lines) == 1, lines
    assert "error: " in lines[0] and flags[0].split("=")[0] in lines[0], lines[0]
