"""train_accelerate.py end to end: a tiny MoE trained on a generated corpus, on CPU.

One 2-process `accelerate launch` run (a module fixture) serves the tests of the log, the loss,
the expert load and the checkpoints, and is the reference that the 1-process run and the
resumed run must reproduce.
"""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from conftest import REPO_ROOT, requires_glibc, tiny_model
from huggingface_hub import HfApi
from safetensors.torch import load_file

import checkpointing
import command_line
import hellaswag
import train_accelerate
from fineweb_shards import write_shard
from gpt2_tokenizer import get_tokenizer
from modeling_gpt_moe import GPTMoEForCausalLM

SCRIPT = str(REPO_ROOT / "train_accelerate.py")
LAUNCH_TWO = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--config_file",
    str(REPO_ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
    SCRIPT,
]
STEPS = 8
# 2 layers of 4 experts (top-2), 32 wide, float32, balanced by the global-batch loss and the aux-loss-free bias;
# 512 tokens per step: 2 processes x 4 sequences x 32 tokens x 2 micro-steps (the 1-process run: 8 sequences)
TINY_RUN = (
    "--n_layer 2 --n_head 2 --n_embd 32 --num_experts 4 --num_experts_per_tok 2 --vocab_size 50304 "
    "--router_aux_loss_scope global_batch --router_bias_update_rate 0.01 "
    "--block_size 32 --seq_len 32 --micro_batch_size 4 --total_batch_size 512 "
    f"--max_steps {STEPS} --warmup_steps 2 --max_lr 1e-2 --min_lr 1e-3 --mixed_precision no "
    "--eval_interval 4 --val_steps 2 --hellaswag_interval 0 --sample_interval 0 --save_interval 4"
).split()
# one thread per process (two share the cores), and a Hub that fails fast
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
HELLASWAG_EXAMPLE = {
    "activity_label": "Cooking",
    "ctx_a": "A man cracks two eggs into a bowl.",
    "ctx_b": "he",
    "ctx": "A man cracks two eggs into a bowl. he",
    "endings": ["whisks them.", "sings loudly.", "paints a wall.", "drives away."],
    "label": 0,
}


def start(command: list, cwd: Path) -> subprocess.Popen:
    command = [str(part) for part in command]
    return subprocess.Popen(command, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(command: list, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [str(part) for part in command]
    return subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def printed(result: subprocess.CompletedProcess) -> str:
    """What a failed run printed: the end of its stdout, then its stderr (a crash's stack, a traceback)."""
    return result.stdout[-3000:] + result.stderr


def parse_recipe(name: str, *flags: str) -> tuple:
    return train_accelerate.parse_arguments(["--config", str(REPO_ROOT / "configs" / f"{name}.yaml"), *flags])


def read_log(output_dir: Path) -> dict[str, dict[int, float]]:
    records: dict[str, dict[int, float]] = {}
    for line in (output_dir / "log.txt").read_text().splitlines():
        step, stream, value = line.split()
        records.setdefault(stream, {})[int(step)] = float(value)
    return records


def aux_losses(stdout: str) -> list[float]:
    """The load-balancing loss of each training step, from the console lines."""
    return [float(value) for value in re.findall(r"^step +\d+ \| loss \S+ \| aux (\S+)", stdout, re.MULTILINE)]


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / f"model_{STEPS:05d}" / "model.safetensors")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Shards of a learnable stream: one fixed cycle of 61 distinct token ids, so each token predicts the next."""
    data_dir = tmp_path_factory.mktemp("corpus")
    cycle = np.random.default_rng(0).permutation(np.arange(1000, 1061)).astype(np.uint16)
    stream = np.tile(cycle, 170)
    write_shard(data_dir / "val_000000.bin", stream[:2048])
    write_shard(data_dir / "train_000000.bin", stream[2048:])
    return data_dir


@pytest.fixture(scope="module")
def two_process_run(corpus, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The reference run: 2 processes, HellaSwag on a small file, samples, and a push to an offline Hub."""
    work = tmp_path_factory.mktemp("two_process")
    (work / "hellaswag.jsonl").write_text(
        "\n".join(json.dumps({**HELLASWAG_EXAMPLE, "label": i}) for i in range(4)) + "\n"
    )
    output_dir = work / "log"
    hub = ["--push_to_hub", "--hub_model_id", "nobody/tiny-moe"]
    flags = [*TINY_RUN, *evaluation_flags(work), *hub, "--data_dir", corpus, "--output_dir", output_dir]
    result = run([*LAUNCH_TWO, *flags], work)
    assert result.returncode == 0, result.stdout + result.stderr
    return output_dir, result


def evaluation_flags(work: Path) -> list:
    """The reference run's HellaSwag (on a 4-example file in `work`) and samples, every 4 steps."""
    return ["--hellaswag_interval", 4, "--hellaswag_file", work / "hellaswag.jsonl", "--sample_interval", 4]


# -----------------------------------------------------------------------------
# the 2-process run


def test_log_txt_keeps_the_seed_format(two_process_run):
    output_dir, result = two_process_run
    lines = (output_dir / "log.txt").read_text().splitlines()
    assert all(re.fullmatch(r"\d+ (train|val|hella) \d+\.\d+", line) for line in lines), lines
    records = read_log(output_dir)
    assert sorted(records["train"]) == list(range(STEPS))
    assert sorted(records["val"]) == sorted(records["hella"]) == [0, 4, 8]
    assert all(0.0 <= acc <= 1.0 for acc in records["hella"].values())
    assert (output_dir / "loss.png").stat().st_size > 0
    assert (output_dir / "expert_load.png").stat().st_size > 0
    assert "Traceback" not in result.stderr
    step_line = next(line for line in result.stdout.splitlines() if line.startswith("step     7 |"))
    for field in ("loss", "aux", "lr", "norm", "dt", "tok/sec", "mfu n/a"):
        assert field in step_line
    assert result.stdout.count("sample 3: Hello, I'm a language model,") == 3  # steps 0, 4 and 8


@requires_glibc
def test_cpu_training_keeps_freed_memory(two_process_run):
    assert "CPU: glibc keeps freed memory" in two_process_run[1].stdout  # cpu_memory.keep_freed_memory took effect


def test_loss_goes_down(two_process_run):
    records = read_log(two_process_run[0])
    assert records["train"][STEPS - 1] < records["train"][0] - 1.0
    assert records["val"][STEPS] < records["val"][0] - 1.0


def test_expert_load_is_reported_and_sums_to_one(two_process_run):
    output_dir, result = two_process_run
    evaluations = [json.loads(line) for line in (output_dir / "expert_load.jsonl").read_text().splitlines()]
    assert [evaluation["step"] for evaluation in evaluations] == [0, 4, 8]
    for evaluation in evaluations:
        assert [layer["layer"] for layer in evaluation["layers"]] == [0, 1]
        for layer in evaluation["layers"]:
            assert len(layer["fractions"]) == 4
            assert sum(layer["fractions"]) == pytest.approx(1.0, abs=1e-6)
            assert layer["max_over_mean"] == pytest.approx(4 * max(layer["fractions"]))
            assert 0.0 < layer["router_entropy"] <= math.log(4) + 1e-6
    assert result.stdout.count("expert load: max/mean") == 2 * 3


def test_checkpoint_is_a_hub_ready_folder_with_the_training_state(two_process_run):
    output_dir, result = two_process_run
    # written under a temporary name, renamed when complete
    assert sorted(p.name for p in output_dir.glob("model_*")) == ["model_00004", "model_00008"]
    checkpoint = output_dir / "model_00008"
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_gpt_moe.GPTMoEForCausalLM"
    for name in ("model.safetensors", "modeling_gpt_moe.py", "configuration_gpt_moe.py", "tokenizer.json"):
        assert (checkpoint / name).is_file(), name
    card = (checkpoint / "README.md").read_text()
    assert "## Training configuration" in card and "validation loss" in card and "total_batch_size: 512" in card
    state = checkpoint / "training_state"
    for name in ("optimizer.bin", "random_states_0.pkl", "random_states_1.pkl"):
        assert (state / name).is_file(), name
    trainer_state = json.loads((state / "trainer_state.json").read_text())
    assert trainer_state["step"] == 8 and trainer_state["world_size"] == 2
    # the Hub folder holds the same weights the training state resumes from
    hub_weights, state_weights = load_file(checkpoint / "model.safetensors"), load_file(state / "model.safetensors")
    for name, tensor in state_weights.items():
        assert torch.equal(hub_weights[name], tensor), name
    # the offline Hub: each push is one warning line, the run goes on
    pushes = [line for line in result.stdout.splitlines() if "push of" in line]
    expected = [f"warning: push of model_0000{step} to nobody/tiny-moe failed: " for step in (4, 8)]
    assert len(pushes) == 2 and all(map(str.startswith, pushes, expected)), pushes


# Runs with its working directory outside the repository and our modules made unimportable: the model comes from the
# checkpoint's own code files (remote code). Prints, as JSON on the last line, the greedy tokens with and without the
# KV cache and, with the cache, the logits of each decoding step over the ids of the training cycle.
REMOTE_CODE_GENERATE = """
import json, sys, torch
for name in ("configuration_gpt_moe", "modeling_gpt_moe"):
    sys.modules[name] = None
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
prompt = torch.tensor([json.loads(sys.argv[2])])
kwargs = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True)
cached, uncached = (model.generate(prompt, use_cache=use_cache, **kwargs) for use_cache in (True, False))
print(json.dumps({
    "module": type(model).__module__,
    "cached": cached.sequences[0].tolist(),
    "uncached": uncached.sequences[0].tolist(),
    "logits": torch.cat(cached.logits)[:, 1000:1061].tolist(),
}))
"""


def generate_as_remote_code(checkpoint: Path, prompt: list[int], cwd: Path) -> dict:
    result = run([sys.executable, "-c", REMOTE_CODE_GENERATE, checkpoint, json.dumps(prompt)], cwd)
    assert result.returncode == 0, printed(result)
    return json.loads(result.stdout.strip().splitlines()[-1])


def greedy_uncached(checkpoint: Path, prompt: list[int]) -> list[int]:
    """What the saved weights generate, loaded with this repository's class and decoded without a cache."""
    saved = GPTMoEForCausalLM.from_pretrained(checkpoint).eval()
    return saved.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, use_cache=False)[0].tolist()


def test_checkpoint_generates_as_remote_code_what_the_saved_model_generates(two_process_run, tmp_path):
    checkpoint = two_process_run[0] / f"model_{STEPS:05d}"
    biases = [t for name, t in load_file(checkpoint / "model.safetensors").items() if name.endswith("expert_bias")]
    assert len(biases) == 2 and all(bias.abs().max() > 0 for bias in biases)  # moved by the aux-loss-free updates
    prompt = [1000 + i for i in (7, 3, 41, 12)]
    got = generate_as_remote_code(checkpoint, prompt, tmp_path)
    assert got["module"].startswith("transformers_modules.")
    expected = greedy_uncached(checkpoint, prompt)
    assert got["cached"] == got["uncached"] == expected
    # each decoding step's logits equal a full forward pass over the sequence so far
    with torch.no_grad():
        full = GPTMoEForCausalLM.from_pretrained(checkpoint)(torch.tensor([expected])).logits
    full = full[0, len(prompt) - 1 : -1, 1000:1061]
    torch.testing.assert_close(torch.tensor(got["logits"]), full, atol=1e-4, rtol=0)


def test_old_checkpoint_takes_new_code_files_with_one_copy(two_process_run, tmp_path):
    # the README's update command for a checkpoint saved with an older modeling file: copy the two code files in
    checkpoint = tmp_path / "model_old"
    shutil.copytree(two_process_run[0] / f"model_{STEPS:05d}", checkpoint)
    modeling = checkpoint / "modeling_gpt_moe.py"
    modeling.write_text(modeling.read_text() + "\nraise ImportError('the old modeling file')\n")
    stale = run([sys.executable, "-c", REMOTE_CODE_GENERATE, checkpoint, "[1000]"], tmp_path)
    assert "the old modeling file" in stale.stderr  # loaded from the checkpoint, and cached by transformers
    weights = (checkpoint / "model.safetensors").read_bytes()
    update = subprocess.run(["cp", "configuration_gpt_moe.py", "modeling_gpt_moe.py", checkpoint], cwd=REPO_ROOT)
    assert update.returncode == 0
    got = generate_as_remote_code(checkpoint, [1000], tmp_path)
    assert got["cached"] == got["uncached"] == greedy_uncached(checkpoint, [1000])
    assert (checkpoint / "model.safetensors").read_bytes() == weights


def test_sample_py_runs_outside_the_repository(two_process_run, tmp_path):
    # a copy of sample.py, run elsewhere: nothing of the repository is on its path
    shutil.copy(REPO_ROOT / "sample.py", tmp_path)
    checkpoint = two_process_run[0] / "model_00008"
    command = [sys.executable, "sample.py", checkpoint, "--num_samples", "2", "--max_new_tokens", "8"]
    result = run(command, tmp_path)
    assert result.returncode == 0, printed(result)
    assert result.stderr == ""  # no warnings
    samples = [line for line in result.stdout.splitlines() if line.startswith("sample ")]
    assert len(samples) == 2 and all("Hello, I'm a language model," in sample for sample in samples)


# -----------------------------------------------------------------------------
# the runs that must reproduce it


def test_one_process_matches_two_processes(two_process_run, corpus, tmp_path):
    # each micro-step's 8 sequences are the two processes' 4 + 4, so the global-batch loss sees the same expert
    # shares (the micro-batch loss would not), and the bias the same step loads
    output_dir = tmp_path / "log"
    flags = [*TINY_RUN, "--micro_batch_size", "8", "--save_total_limit", "1", "--data_dir", corpus]
    result = run([sys.executable, SCRIPT, *flags, "--output_dir", output_dir], tmp_path)
    assert result.returncode == 0, printed(result)
    assert "x 1 processes x 2 accumulation steps" in result.stdout
    assert [p.name for p in output_dir.glob("model_*")] == ["model_00008"]  # model_00004 pruned
    one, two = read_log(output_dir)["train"], read_log(two_process_run[0])["train"]
    # float32: the runs may differ only in the order sums are taken (one batch of 8 against two of 4), which moves
    # the 6-decimal log by a digit; AdamW magnifies such rounding on parameters with near-zero gradients
    assert one == pytest.approx(two, abs=3e-6)
    assert aux_losses(result.stdout) == pytest.approx(aux_losses(two_process_run[1].stdout), abs=3e-6)
    weights_one, weights_two = final_weights(output_dir), final_weights(two_process_run[0])
    for name, tensor in weights_two.items():
        got, expected = weights_one[name], tensor
        if name.endswith("attn.c_attn.bias"):
            # the key bias has no gradient in exact arithmetic (softmax ignores what it adds to all of a query's
            # scores), so AdamW turns the rounding of the two sum orders into updates: noise about 1e-5 in size
            (query, key, value), (query_1, key_1, value_1) = got.chunk(3), expected.chunk(3)
            assert key.abs().max() < 1e-4 and key_1.abs().max() < 1e-4
            got, expected = torch.cat([query, value]), torch.cat([query_1, value_1])
        relative = (got - expected).norm() / expected.norm().clamp(min=1e-12)
        assert relative < 1e-5, (name, relative.item())


def test_resume_continues_exactly(two_process_run, corpus, tmp_path):
    reference_dir = two_process_run[0]
    output_dir = tmp_path / "log"
    output_dir.mkdir()
    shutil.copytree(reference_dir / "model_00004", output_dir / "model_00004")
    shutil.copy(reference_dir / "log.txt", output_dir / "log.txt")  # with the records after step 4: dropped
    resume = ["--resume_from_checkpoint", "latest", "--data_dir", corpus, "--output_dir", output_dir]
    result = run([*LAUNCH_TWO, *TINY_RUN, *evaluation_flags(reference_dir.parent), *resume], tmp_path)
    assert result.returncode == 0, printed(result)
    assert "resumed from" in result.stdout and "at step 4" in result.stdout
    assert (output_dir / "log.txt").read_text() == (reference_dir / "log.txt").read_text()
    resumed, uninterrupted = final_weights(output_dir), final_weights(reference_dir)
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(corpus, tmp_path):
    output_dir = tmp_path / "log"
    endless = [*TINY_RUN, "--max_steps", "100000", "--eval_interval", "0", "--save_interval", "0"]
    command = [sys.executable, SCRIPT, *endless, "--data_dir", corpus, "--output_dir", output_dir]
    process = start(command, tmp_path)
    deadline = time.time() + 180
    while not ((output_dir / "log.txt").exists() and "1 train" in (output_dir / "log.txt").read_text()):
        assert process.poll() is None and time.time() < deadline, "the run did not reach step 1"
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "SIGTERM: saving a checkpoint and stopping after this step" in stdout
    assert "Traceback" not in stderr
    (checkpoint,) = output_dir.glob("model_*")
    last_step = max(read_log(output_dir)["train"])
    assert checkpoint.name == f"model_{last_step + 1:05d}"
    trainer_state = json.loads((checkpoint / "training_state" / "trainer_state.json").read_text())
    assert trainer_state["step"] == last_step + 1


def test_nonfinite_loss_stops_with_a_checkpoint(corpus, tmp_path):
    output_dir = tmp_path / "log"
    # a learning rate this large overflows the weights within a few steps
    exploding = [*TINY_RUN, "--max_lr", "1e30", "--warmup_steps", "1", "--max_nonfinite_steps", "2"]
    result = run([sys.executable, SCRIPT, *exploding, "--data_dir", corpus, "--output_dir", output_dir], tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: 2 steps in a row with a non-finite loss or gradient norm")
    assert "Traceback" not in result.stderr
    assert "update skipped" in result.stdout
    (checkpoint,) = output_dir.glob("model_*")
    assert (checkpoint / "training_state" / "trainer_state.json").is_file()


def test_bad_input_is_one_clear_line(corpus, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "typo.yaml").write_text("max_lrr: 0.001\n")
    (tmp_path / "bad_value.yaml").write_text("max_steps: many\n")
    data = ["--data_dir", corpus]
    cases = {
        "missing data dir": (["--data_dir", tmp_path / "nowhere"], "nowhere: no such directory"),
        "no shards": (["--data_dir", tmp_path / "empty"], "no train shards"),
        "batch arithmetic": ([*data, "--total_batch_size", "1000"], "set --total_batch_size to a multiple of it"),
        "unknown config key": ([*data, "--config", tmp_path / "typo.yaml"], "unknown key 'max_lrr' (did you mean"),
        "bad config value": ([*data, "--config", tmp_path / "bad_value.yaml"], "bad_value.yaml: argument --max_steps"),
        "unknown flag": ([*data, "--max_lrr", "3"], "unknown flag --max_lrr (did you mean '--max_lr'?)"),
        "recipe flag without its file": ([*data, "--config"], "argument --config: expected one argument"),
    }
    # started side by side: each spends most of its few seconds importing
    processes = {
        case: start([sys.executable, SCRIPT, *TINY_RUN, *flags, "--output_dir", tmp_path / "log"], tmp_path)
        for case, (flags, _) in cases.items()
    }
    for case, process in processes.items():
        _, stderr = process.communicate(timeout=180)
        assert process.returncode == 1, case
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, stderr)
        assert cases[case][1] in lines[0], (case, lines[0])


# -----------------------------------------------------------------------------
# faults of the machine: one line, and nothing complete is lost

ONE_PROCESS_RUN = [*TINY_RUN, "--micro_batch_size", "8"]  # the same 512-token steps as the 2-process run
# A child that limits the size of any file it writes once the first checkpoint is saved (RLIMIT_FSIZE): every later
# write past the limit fails with EFBIG, as one fails with ENOSPC on a full disk, whichever library makes it. SIGXFSZ
# is ignored, or the kernel would kill the process instead. Arguments: the repository, the limit, then the run's flags.
LIMITED_AFTER_FIRST_CHECKPOINT = """
import resource, signal, sys
sys.path.insert(0, sys.argv.pop(1))
limit = int(sys.argv.pop(1))
import checkpointing, train_accelerate

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
save = checkpointing.Checkpointer.save

def save_then_limit(self, step, metrics):
    path = save(self, step, metrics)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return path

checkpointing.Checkpointer.save = save_then_limit
sys.exit(train_accelerate.main())
"""
# the 3rd training forward pass (step 1's first micro-step) runs out of GPU memory, on every process
OUT_OF_MEMORY_AT_STEP_1 = """
import sys, torch
sys.path.insert(0, {repo!r})
import modeling_gpt_moe, train_accelerate

forward, calls = modeling_gpt_moe.GPTMoEForCausalLM.forward, []

def forward_until_out_of_memory(self, *args, **kwargs):
    if self.training:
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    return forward(self, *args, **kwargs)

modeling_gpt_moe.GPTMoEForCausalLM.forward = forward_until_out_of_memory
sys.exit(train_accelerate.main())
"""
# what each writer of a checkpoint raises when a write fails, and the OSError write_fault finds behind it
WRITERS_PAST_A_FILE_SIZE_LIMIT = """
import json, resource, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
from safetensors.torch import save_file
from command_line import write_fault
from gpt2_tokenizer import get_tokenizer

tokenizer, tensors = get_tokenizer(), {"weight": torch.zeros(1000)}
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
writers = {
    "safetensors": lambda: save_file(tensors, "weights.safetensors"),
    "torch.save": lambda: torch.save(tensors, "optimizer.bin"),
    "tokenizers": lambda: tokenizer.save_pretrained("tokenizer"),
    "python": lambda: Path("card.md").write_text("x" * 2000),
}
faults = {}
for name, write in writers.items():
    try:
        write()
    except Exception as error:
        fault = write_fault(error)
        faults[name] = fault and [fault.errno, fault.strerror]
print(json.dumps(faults))
"""


@pytest.fixture(scope="module")
def one_process_run(corpus, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """An uninterrupted 1-process run whose plots cannot be written: a folder stands where each would go."""
    output_dir = tmp_path_factory.mktemp("one_process") / "log"
    for image in ("loss.png", "expert_load.png"):
        (output_dir / image).mkdir(parents=True)
    command = [sys.executable, SCRIPT, *ONE_PROCESS_RUN, "--data_dir", corpus, "--output_dir", output_dir]
    return output_dir, run(command, output_dir.parent)


def test_plots_that_cannot_be_written_are_warnings_and_every_checkpoint_is_saved(one_process_run):
    output_dir, result = one_process_run
    assert result.returncode == 0 and "Traceback" not in result.stderr, printed(result)
    for image in ("loss.png", "expert_load.png"):
        warning = (
            f"warning: cannot write {output_dir / image}: Is a directory; it is drawn again at the next evaluation"
        )
        assert result.stdout.count(warning) == 3, result.stdout  # steps 0, 4 and 8
    assert sorted(p.name for p in output_dir.glob("model_*")) == ["model_00004", "model_00008"]
    records = read_log(output_dir)
    assert sorted(records["train"]) == list(range(STEPS)) and sorted(records["val"]) == [0, 4, 8]


@pytest.mark.parametrize(
    "limit, cause, remedy",
    [
        # model.safetensors (6.7 MB) is the first file past 1 MB: safetensors' SafetensorError
        (10**6, "File too large", "lift the file size limit (ulimit -f, or the filesystem's own)"),
        # optimizer.bin (13.5 MB) is the only one past 10 MB: torch.save's RuntimeError, which gives no cause
        (10**7, "torch.save stopped part-way without saying why", "check the path and its filesystem"),
    ],
    ids=["weights", "optimizer"],
)
def test_a_checkpoint_that_cannot_be_written_is_one_line_and_the_run_resumes(
    one_process_run, corpus, tmp_path, limit, cause, remedy
):
    uninterrupted, uninterrupted_result = one_process_run
    assert uninterrupted_result.returncode == 0, printed(uninterrupted_result)
    output_dir = tmp_path / "log"
    flags = [*ONE_PROCESS_RUN, "--data_dir", corpus, "--output_dir", output_dir]
    result = run([sys.executable, "-c", LIMITED_AFTER_FIRST_CHECKPOINT, REPO_ROOT, limit, *flags], tmp_path)
    assert result.returncode == 1, printed(result)
    kept = output_dir / "model_00004"
    assert result.stderr.splitlines() == [
        f"error: cannot write {output_dir / 'model_00008.tmp'}: {cause}; the last complete checkpoint is {kept} "
        f"(step 4): {remedy} and resume with --resume_from_checkpoint latest"
    ]
    assert sorted(p.name for p in output_dir.glob("model_*")) == ["model_00004"]  # the partial folder removed
    saved = GPTMoEForCausalLM.from_pretrained(kept).state_dict()
    for name, tensor in load_file(uninterrupted / "model_00004" / "model.safetensors").items():
        assert torch.equal(saved[name], tensor), name

    resumed = run([sys.executable, SCRIPT, *flags, "--resume_from_checkpoint", "latest"], tmp_path)
    assert resumed.returncode == 0, printed(resumed)
    assert (output_dir / "log.txt").read_text() == (uninterrupted / "log.txt").read_text()
    resumed_weights = final_weights(output_dir)
    for name, tensor in final_weights(uninterrupted).items():
        assert torch.equal(resumed_weights[name], tensor), name


def test_write_fault_finds_the_cause_behind_each_checkpoint_writer(tmp_path):
    result = run([sys.executable, "-c", WRITERS_PAST_A_FILE_SIZE_LIMIT, REPO_ROOT], tmp_path)
    assert result.returncode == 0, printed(result)
    too_large = [27, "File too large"]  # EFBIG
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "safetensors": too_large,
        "torch.save": [None, "torch.save stopped part-way without saying why"],
        "tokenizers": too_large,
        "python": too_large,
    }
    assert command_line.write_fault(ValueError("a bug, not a fault of the disk")) is None


def test_a_failed_hub_push_is_one_warning_and_training_never_waits(tmp_path, monkeypatch):
    pushed, release = [], threading.Event()

    class FlakyHub(HfApi):  # HfApi's own background queue, with a Hub that fails the first upload
        def create_repo(self, repo_id, **kwargs):
            pushed.append(f"create {repo_id}")

        def upload_folder(self, *, folder_path, ignore_patterns, **kwargs):
            assert release.wait(timeout=10), "upload() waited for the upload"
            pushed.append(f"upload {folder_path.name} without {ignore_patterns}")
            if folder_path.name == "model_00004":
                raise ConnectionError("the Hub is out of reach\n(Caused by NameResolutionError)")

    monkeypatch.setattr(checkpointing, "HfApi", FlakyHub)
    lines = []
    uploader = checkpointing.HubUploader("nobody/tiny-moe", log=lines.append)
    uploader.upload(tmp_path / "model_00004")
    uploader.upload(tmp_path / "model_00008")
    assert lines == []  # both queued while the first is still under way
    release.set()
    uploader.close()  # waits for both
    assert lines == [
        "warning: push of model_00004 to nobody/tiny-moe failed: the Hub is out of reach",
        "pushed model_00008 to https://huggingface.co/nobody/tiny-moe",
    ]
    assert pushed == [
        "create nobody/tiny-moe",
        "upload model_00004 without ['training_state/*']",
        "upload model_00008 without ['training_state/*']",
    ]


@pytest.mark.parametrize("processes", [1, 2])
def test_out_of_gpu_memory_is_one_line_on_every_process(corpus, tmp_path, processes):
    script = tmp_path / "out_of_memory.py"
    script.write_text(OUT_OF_MEMORY_AT_STEP_1.format(repo=str(REPO_ROOT)))
    output_dir = tmp_path / "log"
    flags = [*TINY_RUN, "--micro_batch_size", 8 // processes, "--data_dir", corpus, "--output_dir", output_dir]
    launch = [sys.executable] if processes == 1 else LAUNCH_TWO[:-1]
    result = run([*launch, script, *flags], tmp_path)
    assert result.returncode == 1, printed(result)
    line = (
        f"error: out of GPU memory with --micro_batch_size {8 // processes} sequences of --seq_len 32 tokens per "
        "forward pass; no checkpoint yet: lower --micro_batch_size (gradient accumulation takes more micro-steps "
        "and keeps --total_batch_size 512) and run the command again"
    )
    if processes == 1:
        assert result.stderr.splitlines() == [line]
    else:  # each process's own line; the launcher then reports the failure in its own words
        assert sorted(re.findall(r"^\[rank \d\] .*", result.stderr, re.MULTILINE)) == [
            f"[rank {rank}] {line}" for rank in range(processes)
        ]
    assert "OutOfMemoryError" not in result.stderr  # no traceback of it
    assert not list(output_dir.glob("model_*"))  # nothing saved of the step that failed


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="/dev/full fails every write with ENOSPC")
def test_sample_py_writing_to_a_full_disk_is_one_line(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    tiny_model(vocab_size=50304).save_pretrained(checkpoint)
    get_tokenizer().save_pretrained(checkpoint)
    command = [sys.executable, REPO_ROOT / "sample.py", checkpoint, "--num_samples", "2", "--max_new_tokens", "4"]
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [str(part) for part in command], cwd=tmp_path, env=ENV, stdout=full, stderr=subprocess.PIPE, text=True
        )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: cannot write the samples to stdout: No space left on device; free some space or write them "
        "elsewhere and rerun (the same --seed gives the same samples)"
    ]


# -----------------------------------------------------------------------------
# in-process: arguments, schedule, optimizer, configs


def test_a_truncated_cached_hellaswag_split_is_an_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv(hellaswag.DATA_DIR_ENV, str(tmp_path))
    cached = hellaswag.val_file_path()
    cached.write_text("\n".join(json.dumps({**HELLASWAG_EXAMPLE, "label": i % 4}) for i in range(30)) + "\n")
    args = train_accelerate.TrainArguments(hellaswag_interval=10)
    with pytest.raises(hellaswag.HellaSwagError, match=f"{re.escape(str(cached))} has 30 examples, expected 10042"):
        train_accelerate.load_hellaswag(args, get_tokenizer(), block_size=1024, log=print)


def test_help_lists_training_and_model_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_accelerate.parse_arguments(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--config", "--total_batch_size", "--resume_from_checkpoint", "--num_experts", "--mlp_only_layers"):
        assert flag in text


@pytest.mark.parametrize(
    "recipe, world_sizes",
    [("gpt2_moe_124m", [1, 8]), ("gpt2_dense_124m", [1, 8]), ("gpt2_moe_fine_grained", [1, 8]), ("tiny_cpu", [1, 2])],
)
def test_recipes_parse_and_their_batch_divides(recipe, world_sizes):
    model_args, args = parse_recipe(recipe)
    for world_size in world_sizes:
        assert train_accelerate.gradient_accumulation_steps(args, world_size) >= 1
    assert args.seq_len <= model_args.block_size


def test_seed_recipe_is_build_nanogpts_run():
    model_args, args = parse_recipe("gpt2_moe_124m")
    assert (model_args.n_layer, model_args.n_head, model_args.n_embd, model_args.vocab_size) == (12, 12, 768, 50304)
    assert model_args.use_moe
    assert (args.total_batch_size, args.micro_batch_size, args.seq_len) == (524288, 16, 1024)
    assert (args.max_lr, args.min_lr, args.warmup_steps, args.max_steps) == (6e-4, 6e-5, 715, 19073)
    assert (args.weight_decay, args.grad_clip, args.eval_interval, args.save_interval) == (0.1, 1.0, 250, 5000)
    assert train_accelerate.gradient_accumulation_steps(args, 8) == 4


def test_unknown_tracker_is_a_clear_error():
    with pytest.raises(train_accelerate.TrainingError, match="unknown tracker 'tensorbored'"):
        parse_recipe("tiny_cpu", "--report_to", "tensorbored")


def test_command_line_overrides_the_recipe():
    model_args, args = parse_recipe("tiny_cpu", "--max_steps", "7", "--n_layer", "3")
    assert (args.max_steps, model_args.n_layer) == (7, 3)


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    args = train_accelerate.TrainArguments(max_lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=100)
    lrs = [train_accelerate.get_lr(step, args) for step in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[100] == pytest.approx(0.1)


def test_weight_decay_applies_to_matrices_including_stacked_experts():
    model = tiny_model()
    optimizer = train_accelerate.configure_optimizer(
        model, train_accelerate.TrainArguments(weight_decay=0.1), torch.device("cpu")
    )
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    names = {name: id(p) in decayed for name, p in model.named_parameters()}
    assert names["transformer.h.0.mlp.experts.up_proj"] and names["transformer.h.0.mlp.router.weight"]
    assert not names["transformer.h.0.mlp.experts.up_proj_bias"] and not names["transformer.h.0.ln_1.weight"]
    assert optimizer.param_groups[1]["weight_decay"] == 0.0


def test_accelerate_configs_load():
    paths = (REPO_ROOT / "accelerate_configs").glob("*.yaml")
    configs = {path.stem: load_config_from_file(str(path)) for path in paths}
    assert set(configs) == {"single_gpu", "multi_gpu", "multi_node", "fsdp2", "deepspeed_zero2", "cpu_2proc"}
    assert configs["fsdp2"].fsdp_config["fsdp_version"] == 2
    assert configs["deepspeed_zero2"].deepspeed_config["zero_stage"] == 2
    assert (configs["cpu_2proc"].num_processes, configs["cpu_2proc"].distributed_type) == (2, "MULTI_GPU")
