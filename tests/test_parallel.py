"""Beyond one machine's DDP, on CPU with gloo: two machines, FSDP2, tensor and expert parallelism.

Each job is one multi-process launch, a module fixture whose results several tests read. Accelerate runs FSDP2 on
accelerators only (on CPU it silently falls back to DDP, README "Parallelism"), so FSDP2 is tested with torch's
fully_shard directly; the processes of the sharded jobs run tests/parallel_workers.py.
"""

import json
import socket
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, tiny_model
from parallel_workers import CHECKPOINT_STEP
from safetensors.torch import load_file
from test_train import LAUNCH_TWO, SCRIPT, TINY_RUN, corpus, final_weights, printed, read_log, run, start  # noqa: F401
from transformers.distributed import DistributedConfig

WORKER = str(Path(__file__).with_name("parallel_workers.py"))
MULTI_NODE = REPO_ROOT / "accelerate_configs" / "multi_node.yaml"
TORCHRUN_TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER]
ONE_CHECKPOINT = ["--save_interval", "0", "--eval_interval", "0"]  # evaluate and save at the last step only
# transformers 5.2x shards experts with ep_size, next to tensor or data parallelism; 5.17 with enable_expert_parallel,
# on the ranks of tensor parallelism (whose plan it then replaces)
HAS_EP_SIZE = "ep_size" in DistributedConfig.__dataclass_fields__
EXPERT_PARALLEL = {"tp_size": 2, "ep_size": 2} if HAS_EP_SIZE else {"tp_size": 2, "enable_expert_parallel": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_results(folder: Path, prefix: str = "result") -> list[dict]:
    return [json.loads((folder / f"{prefix}_{rank}.json").read_text()) for rank in (0, 1)]


# -----------------------------------------------------------------------------
# two machines of one process each, on this host


@pytest.fixture(scope="module")
def one_machine_run(corpus, tmp_path_factory) -> Path:  # noqa: F811
    work = tmp_path_factory.mktemp("one_machine")
    result = run([*LAUNCH_TWO, *TINY_RUN, *ONE_CHECKPOINT, "--data_dir", corpus, "--output_dir", work / "log"], work)
    assert result.returncode == 0, printed(result)
    return work / "log"


def test_two_machines_match_one_machine_with_two_processes(one_machine_run, corpus, tmp_path):  # noqa: F811
    # README "Parallelism": the same command on each machine but for its --machine_rank; here both reach machine 0's
    # rendezvous on localhost and share the data and output folders, as nodes share a filesystem
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", MULTI_NODE, "--num_machines", 2]
    launch += ["--num_processes", 2, "--main_process_ip", "127.0.0.1", "--main_process_port", free_port()]
    flags = [*TINY_RUN, *ONE_CHECKPOINT, "--data_dir", corpus, "--output_dir", tmp_path / "log"]
    machines = [start([*launch, "--machine_rank", rank, SCRIPT, *flags], tmp_path) for rank in (0, 1)]
    for machine in machines:
        stdout, stderr = machine.communicate(timeout=240)
        assert machine.returncode == 0, stdout[-3000:] + stderr
        assert "x 2 processes" in stdout  # one world of two processes, not two runs of one
    assert [p.name for p in (tmp_path / "log").glob("model_*")] == ["model_00008"]
    assert read_log(tmp_path / "log") == read_log(one_machine_run)
    expected = final_weights(one_machine_run)
    for name, tensor in final_weights(tmp_path / "log").items():
        assert torch.equal(tensor, expected[name]), name


# -----------------------------------------------------------------------------
# FSDP2: torch's fully_shard, as Accelerate would apply it on GPUs


@pytest.fixture(scope="module")
def fully_sharded_runs(tmp_path_factory) -> Path:
    """4 steps from scratch (checkpoint after CHECKPOINT_STEP), then the same steps resumed from that checkpoint."""
    work = tmp_path_factory.mktemp("fully_shard")
    for start_step in (0, CHECKPOINT_STEP):
        result = run([*TORCHRUN_TWO, "fully_shard", work, start_step, 4], work)
        assert result.returncode == 0, printed(result)
    return work


def test_fully_sharded_training_matches_unsharded(fully_sharded_runs):
    for result in rank_results(fully_sharded_runs, "result_from_0"):
        # MoE layers, 2 accumulation steps, gradient clipping, train_accelerate's AdamW
        assert result["loss"] < 1e-6 and result["grad"] < 1e-6, result
        # relative; the key bias has no gradient in exact arithmetic (softmax ignores a shift of all of a query's
        # scores), so AdamW turns rounding into lr-sized steps there: about 2e-4 of its norm after 4 steps
        assert result["weight"] < 1e-3, result


def test_fully_sharded_checkpoint_is_a_model_folder_with_our_code(fully_sharded_runs):
    folder = fully_sharded_runs / f"model_{CHECKPOINT_STEP:05d}"
    code = {p.name for p in folder.glob("*.py")}
    assert code == {"modeling_gpt_moe.py", "configuration_gpt_moe.py"}  # not torch's FSDP files (save_model)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_gpt_moe.GPTMoEForCausalLM"
    assert config["architectures"] == ["GPTMoEForCausalLM"]
    assert rank_results(fully_sharded_runs, "result_from_0")[0]["loaded"] == 0.0  # from_pretrained: every weight


def test_fully_sharded_resume_continues_exactly(fully_sharded_runs):
    uninterrupted = load_file(fully_sharded_runs / "final_0.safetensors")
    resumed = load_file(fully_sharded_runs / f"final_{CHECKPOINT_STEP}.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name


# -----------------------------------------------------------------------------
# transformers' tensor and expert parallelism: 2 processes against 1, every bias random and non-zero


@pytest.fixture(scope="module")
def sharded_models(tmp_path_factory) -> dict[str, list[dict]]:
    work = tmp_path_factory.mktemp("sharded_models")
    for name, overrides in {
        "dense": dict(use_moe=False),
        "moe": dict(n_shared_experts=1, mlp_only_layers=[0]),
    }.items():
        model = tiny_model(seed=18, **overrides)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if param_name.endswith("bias"):
                    param.normal_(std=0.5)
        model.save_pretrained(work / name)
    cases = {
        "tensor_parallel_dense": ("dense", {"tp_plan": "auto"}),  # what from_pretrained(tp_plan="auto") builds
        "tensor_parallel_moe": ("moe", {"tp_plan": "auto"}),
        "expert_parallel": ("moe", EXPERT_PARALLEL),
    }
    if HAS_EP_SIZE:  # the layout transformers trains expert parallelism with: FSDP for the rest
        cases["expert_and_data_parallel"] = ("moe", {"fsdp_size": 2, "ep_size": 2})
    cases_file = work / "cases.json"
    cases_file.write_text(
        json.dumps([dict(name=n, model=str(work / m), distributed_config=c) for n, (m, c) in cases.items()])
    )
    result = run([*TORCHRUN_TWO, "sharded_models", cases_file, work], work)
    assert result.returncode == 0, printed(result)
    ranks = rank_results(work)
    return {name: [results[name] for results in ranks] for name in ranks[0]}


def assert_matches_one_process(results: list[dict]) -> None:
    for result in results:
        assert result["logits_diff"] < 1e-5 and result["grad_diff"] < 1e-5, result


def test_tensor_parallel_matches_one_process(sharded_models):
    dense, moe = sharded_models["tensor_parallel_dense"], sharded_models["tensor_parallel_moe"]
    assert_matches_one_process(dense + moe)
    assert {"transformer.wte.weight", "transformer.h.*.mlp.c_fc.weight", "transformer.h.*.mlp.c_proj.weight"} <= set(
        dense[0]["sharded"]
    )
    assert "transformer.h.*.mlp.shared_experts.c_fc.weight" in moe[0]["sharded"]
    assert moe[0]["local_experts"] == 4  # whole: expert parallelism shards them (configuration_gpt_moe.py)


@pytest.mark.parametrize("case", ["expert_parallel", "expert_and_data_parallel"])
def test_expert_parallel_matches_one_process(sharded_models, case):
    if case not in sharded_models:
        pytest.skip("transformers 5.17 has no ep_size: expert parallelism there takes the ranks of tensor parallelism")
    assert_matches_one_process(sharded_models[case])
    for result in sharded_models[case]:
        assert result["local_experts"] == 2  # of 4, biases included
        assert "transformer.h.*.mlp.experts.down_proj_bias" in result["sharded"]
