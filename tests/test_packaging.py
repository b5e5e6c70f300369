"""`pip install .` (not editable): one top-level package, the vocabulary with the code, the tools runnable."""

import subprocess
import sys

import pytest
from conftest import REPO_ROOT

# Runs in a fresh interpreter, outside the repository, with only the installed copy to import from
INSTALLED_USE = """
import sys
import torch
from gpt_moe import gpt2_tokenizer, modeling_gpt_moe
from gpt_moe.gpt2_tokenizer import get_encoding, get_tokenizer
from gpt_moe.modeling_gpt_moe import GPTMoEConfig, GPTMoEForCausalLM
for module in (gpt2_tokenizer, modeling_gpt_moe):  # the installed copy, not the repository
    assert module.__file__.startswith(sys.argv[2]), module.__file__
assert get_encoding().encode("Hello, world") == get_tokenizer()("Hello, world")["input_ids"] == [15496, 11, 995]
torch.manual_seed(0)
model = GPTMoEForCausalLM(GPTMoEConfig(vocab_size=96, block_size=32, n_layer=2, n_head=2, n_embd=32, num_experts=4))
model.save_pretrained(sys.argv[1])
print(model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)[0].tolist())
"""
REMOTE_CODE_USE = """
import sys
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
print(model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)[0].tolist())
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site-packages")
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(REPO_ROOT)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return target


def run_installed(installed, tmp_path, *command) -> str:
    env = {"PYTHONPATH": str(installed), "PATH": f"{installed / 'bin'}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_installs_one_top_level_package_with_the_vocabulary(installed):
    top_level = {path.name for path in installed.iterdir() if not path.name.endswith(".dist-info")}
    assert top_level == {"gpt_moe", "bin"}
    assert (installed / "gpt_moe" / "gpt2.tiktoken").is_file()
    assert (installed / "gpt_moe" / "modeling_gpt_moe.py").is_file()


def test_installed_package_saves_a_model_that_loads_as_remote_code(installed, tmp_path):
    model = str(tmp_path / "model")
    tokens = run_installed(installed, tmp_path, sys.executable, "-c", INSTALLED_USE, model, str(installed / "gpt_moe"))
    assert run_installed(installed, tmp_path, sys.executable, "-c", REMOTE_CODE_USE, model) == tokens


@pytest.mark.parametrize(
    "tool", ["gpt-moe-train", "gpt-moe-prepare", "gpt-moe-sample", "gpt-moe-hellaswag", "gpt-moe-convert"]
)
def test_console_scripts_start(installed, tmp_path, tool):
    assert "usage:" in run_installed(installed, tmp_path, tool, "--help")
