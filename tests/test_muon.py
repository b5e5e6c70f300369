"""muon.py and `train_accelerate.py --optimizer muon`: the batched orthogonalisation of expert stacks, which
parameters Muon takes, and training with it on CPU.

One 2-process run (a module fixture) is the reference that the 1-process run and the resumed run must reproduce,
as in test_train.py, whose learnable corpus and launch helpers these reuse.
"""

import shutil
import sys
from pathlib import Path

import pytest
import test_train
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from conftest import tiny_model
from safetensors.torch import load_file
from test_train import LAUNCH_TWO, SCRIPT, printed, read_log, run, start

import train_accelerate
from muon import CombinedOptimizer, StackedMuon, orthogonalise

corpus = test_train.corpus  # the module fixture: a cycle of 61 token ids, each predicting the next
STEPS = 8
# test_train.py's tiny run with the default router settings: 2 layers of 4 experts (top-2), 32 wide, float32;
# 256 tokens per step: 2 processes x 4 x 32, or 1 process x 4 x 32 x 2 micro-steps, so both sum the same
# gradients in the same order. Validation only at the end: the tests read the training loss.
MUON_RUN = (
    "--optimizer muon --n_layer 2 --n_head 2 --n_embd 32 --num_experts 4 --num_experts_per_tok 2 --vocab_size 50304 "
    "--block_size 32 --seq_len 32 --micro_batch_size 4 --total_batch_size 256 "
    f"--max_steps {STEPS} --warmup_steps 2 --max_lr 1e-2 --min_lr 1e-3 --mixed_precision no "
    "--eval_interval 0 --val_steps 2 --hellaswag_interval 0 --sample_interval 0 --save_interval 4"
).split()
CPU = torch.device("cpu")


def expert_stack(shape: tuple[int, int, int]) -> torch.Tensor:
    """Random matrices at scales 1e-3 to 1e2, so that a norm taken over the whole stack would show."""
    torch.manual_seed(0)
    return torch.randn(shape) * torch.logspace(-3, 2, shape[0])[:, None, None]


# -----------------------------------------------------------------------------
# the optimizer


@pytest.mark.parametrize("shape", [(6, 96, 24), (6, 24, 96)], ids=["up_proj", "down_proj"])
def test_orthogonalising_a_stack_is_orthogonalising_each_matrix_alone(shape):
    stack = expert_stack(shape)
    together = orthogonalise(stack)
    assert together.shape == stack.shape
    for expert in range(shape[0]):
        torch.testing.assert_close(together[expert], orthogonalise(stack[expert : expert + 1])[0], atol=2e-3, rtol=0)
    # the quintic Newton-Schulz iteration puts every singular value near 1, not at 1 (about 0.7-1.2)
    singular_values = torch.linalg.svdvals(together.float())
    assert singular_values.min() > 0.6 and singular_values.max() < 1.25, singular_values


def test_each_expert_gets_the_update_torch_muon_gives_a_matrix():
    stack = torch.nn.Parameter(expert_stack((4, 64, 16)))
    matrices = [torch.nn.Parameter(matrix.clone()) for matrix in stack.detach()]
    settings = dict(lr=0.05, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    stacked, reference = StackedMuon([stack], **settings), torch.optim.Muon(matrices, **settings)
    for _ in range(3):  # momentum, Nesterov, weight decay and the lr scaling all take part
        grads = torch.randn(stack.shape)
        stack.grad = grads.clone()
        for matrix, grad in zip(matrices, grads, strict=True):
            matrix.grad = grad.clone()
        stacked.step()
        reference.step()
    for expert, matrix in enumerate(matrices):
        torch.testing.assert_close(stack[expert], matrix, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(2, 128, 32), (2, 32, 128), (2, 64, 64)])
def test_rms_matching_gives_every_shape_adamws_update_size(shape):
    # Moonlight's scaling: 0.2 * sqrt(max(out, in)) times the orthogonalised update has RMS about 0.2 at lr 1
    param = torch.nn.Parameter(torch.zeros(shape))
    param.grad = torch.randn(shape)
    StackedMuon([param], lr=1.0, weight_decay=0.0, adjust_lr_fn="match_rms_adamw").step()
    rms = param.detach().pow(2).mean().sqrt().item()
    assert 0.15 < rms < 0.22, rms


ATTENTION = ["attn.c_attn.weight", "attn.c_proj.weight"]
EXPERTS = ["mlp.experts.up_proj", "mlp.experts.down_proj"]
SHARED = ["mlp.shared_experts.c_fc.weight", "mlp.shared_experts.c_proj.weight"]


@pytest.mark.parametrize(
    "overrides, matrices, stacks",
    [
        (dict(use_moe=False), [*ATTENTION, "mlp.c_fc.weight", "mlp.c_proj.weight"], []),
        ({}, ATTENTION, EXPERTS),
        (dict(n_shared_experts=1), [*ATTENTION, *SHARED], EXPERTS),
    ],
    ids=["dense", "moe", "moe with shared experts"],
)
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(overrides, matrices, stacks):
    model = tiny_model(**overrides)
    args = train_accelerate.TrainArguments(optimizer="muon", max_lr=3e-3, weight_decay=0.05)
    optimizer = train_accelerate.configure_optimizer(model, args, CPU)
    assert isinstance(optimizer, CombinedOptimizer)
    names = {id(param): name for name, param in model.named_parameters()}
    taken = {
        type(inner).__name__: {names[id(p)] for g in inner.param_groups for p in g["params"]}
        for inner in optimizer.optimizers
    }
    layers = range(model.config.n_layer)
    assert taken["Muon"] == {f"transformer.h.{i}.{suffix}" for i in layers for suffix in matrices}
    assert taken.get("StackedMuon", set()) == {f"transformer.h.{i}.{suffix}" for i in layers for suffix in stacks}
    # embeddings (the output layer is the same tensor as wte), router, biases, LayerNorms: AdamW
    assert taken["AdamW"] == set(names.values()) - taken["Muon"] - taken.get("StackedMuon", set())
    assert model.lm_head.weight is model.transformer.wte.weight and "transformer.wte.weight" in taken["AdamW"]
    assert "transformer.wpe.weight" in taken["AdamW"] and "transformer.ln_f.weight" in taken["AdamW"]
    if stacks:
        assert {"transformer.h.0.mlp.router.weight", "transformer.h.0.mlp.experts.up_proj_bias"} <= taken["AdamW"]
    # one learning rate for all; Muon's updates RMS-matched to AdamW's, so max_lr and weight_decay carry over
    for inner in optimizer.optimizers[:-1]:
        assert [(g["lr"], g["weight_decay"], g["adjust_lr_fn"]) for g in inner.param_groups] == [
            (3e-3, 0.05, "match_rms_adamw")
        ]
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.optimizers[-1].param_groups] == [(3e-3, 0.05), (3e-3, 0.0)]


def test_adamw_stays_the_default():
    optimizer = train_accelerate.configure_optimizer(tiny_model(), train_accelerate.TrainArguments(), CPU)
    assert type(optimizer) is torch.optim.AdamW


def train_one_step(model, optimizer, lr: float) -> None:
    for group in optimizer.param_groups:  # as train_step sets the schedule's lr
        group["lr"] = lr
    tokens = torch.arange(32)[None] % 96
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 weights and gradients, bf16 matmuls
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_combined_state_round_trips_and_the_schedule_still_reaches_every_optimizer(tmp_path):
    # bf16 autocast; after one step, a copy restored from the saved optimizer state takes the same second step
    args = train_accelerate.TrainArguments(optimizer="muon")
    models = [tiny_model(n_shared_experts=1).train() for _ in range(2)]
    optimizers = [train_accelerate.configure_optimizer(model, args, CPU) for model in models]
    train_one_step(models[0], optimizers[0], lr=1e-2)
    torch.save(optimizers[0].state_dict(), tmp_path / "optimizer.bin")
    models[1].load_state_dict(models[0].state_dict())
    optimizers[1].load_state_dict(torch.load(tmp_path / "optimizer.bin", weights_only=True))
    for model, optimizer in zip(models, optimizers, strict=True):
        train_one_step(model, optimizer, lr=3e-2)
        assert {g["lr"] for inner in optimizer.optimizers for g in inner.param_groups} == {3e-2}
    for mine, theirs in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert mine.dtype == torch.float32 and torch.equal(mine, theirs)


# -----------------------------------------------------------------------------
# training with --optimizer muon


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / f"model_{STEPS:05d}" / "model.safetensors")


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict:
    """The reference 2-process run, and the 1-process run started beside it (alone it would leave a core idle)."""
    work = tmp_path_factory.mktemp("muon")
    data = ["--data_dir", corpus]
    one_process = start([sys.executable, SCRIPT, *MUON_RUN, *data, "--output_dir", work / "one"], work)
    result = run([*LAUNCH_TWO, *MUON_RUN, *data, "--output_dir", work / "two"], work)
    assert result.returncode == 0, printed(result)
    yield {"two": work / "two", "one": work / "one", "one_process": one_process}
    one_process.kill()  # if its test did not wait for it


@pytest.fixture(scope="module")
def two_process_run(runs) -> Path:
    return runs["two"]


def test_loss_falls_with_muon(two_process_run):
    train = read_log(two_process_run)["train"]
    assert sorted(train) == list(range(STEPS))
    assert train[STEPS - 1] < train[0] - 1.0, train


def test_one_process_matches_two_processes(runs):
    stdout, stderr = runs["one_process"].communicate(timeout=240)
    assert runs["one_process"].returncode == 0, stdout[-3000:] + stderr
    assert "x 1 processes x 2 accumulation steps" in stdout
    # float32, the same gradient sums: Muon's bf16 Newton-Schulz gets the same input on one process as on two
    assert read_log(runs["one"])["train"] == pytest.approx(read_log(runs["two"])["train"], abs=1e-6)
    weights_one, weights_two = final_weights(runs["one"]), final_weights(runs["two"])
    for name, tensor in weights_two.items():
        relative = (weights_one[name] - tensor).norm() / tensor.norm().clamp(min=1e-12)
        assert relative < 1e-5, (name, relative.item())


def test_resume_continues_exactly(two_process_run, corpus, tmp_path):
    output_dir = tmp_path / "log"
    output_dir.mkdir()
    shutil.copytree(two_process_run / "model_00004", output_dir / "model_00004")
    shutil.copy(two_process_run / "log.txt", output_dir / "log.txt")  # with the records after step 4: dropped
    resume = ["--resume_from_checkpoint", "latest", "--data_dir", corpus, "--output_dir", output_dir]
    result = run([*LAUNCH_TWO, *MUON_RUN, *resume], tmp_path)
    assert result.returncode == 0, printed(result)
    assert "at step 4" in result.stdout
    # the momentum buffers and AdamW's moments came back: the same losses and bit-identical weights
    assert (output_dir / "log.txt").read_text() == (two_process_run / "log.txt").read_text()
    resumed, uninterrupted = final_weights(output_dir), final_weights(two_process_run)
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name


@pytest.fixture
def fresh_accelerate_state():
    """main() in this process builds an Accelerator; leave no state behind for other tests."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def one_line_error(argv: list, capsys) -> str:
    assert train_accelerate.main([str(arg) for arg in argv]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_muon_under_fsdp_is_one_line(corpus, tmp_path, monkeypatch, capsys, fresh_accelerate_state):
    # FSDP needs GPUs; the check reads the distributed type Accelerate reports, so that is what is faked
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    error = one_line_error([*MUON_RUN, "--data_dir", corpus, "--output_dir", tmp_path / "log"], capsys)
    assert "--optimizer muon needs every weight matrix whole on each process, and FSDP shards them" in error


def test_resuming_with_another_optimizer_is_one_line(
    two_process_run, corpus, tmp_path, capsys, fresh_accelerate_state
):
    checkpoint = two_process_run / "model_00004"
    adamw_run = [flag for flag in MUON_RUN if flag not in ("--optimizer", "muon")]  # the default
    resume = ["--resume_from_checkpoint", checkpoint, "--data_dir", corpus, "--output_dir", tmp_path / "log"]
    error = one_line_error([*adamw_run, *resume], capsys)
    assert error == f"error: cannot resume from {checkpoint}: it was trained with --optimizer muon; resume with it"
