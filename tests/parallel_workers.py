"""What tests/test_parallel.py runs in each process of a 2-process gloo group (torchrun), one command per job:

    python -m torch.distributed.run --standalone --nproc_per_node 2 parallel_workers.py sharded_models CASES.json OUT
    python -m torch.distributed.run --standalone --nproc_per_node 2 parallel_workers.py fully_shard WORK START STOP

Each rank writes its results to a JSON file of its own (the stdout lines of two processes interleave).
"""

import json
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered from the ranks that hold its shards."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor) and not all(placement.is_replicate() for placement in tensor.placements)


def max_grad_diff(model: torch.nn.Module, reference: torch.nn.Module) -> float:
    grads = {name: param.grad for name, param in reference.named_parameters()}
    return max((full(param.grad) - grads[name]).abs().max().item() for name, param in model.named_parameters())


def sharded_models(cases_file: str, out: str) -> None:
    """For each case, the checkpoint loaded as remote code with its distributed_config against the same checkpoint
    in one process: logits, and the gradients of a training forward (loss with the router losses)."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    sys.modules["modeling_gpt_moe"] = sys.modules["configuration_gpt_moe"] = None  # the checkpoint's own code files
    results = {}
    for case in json.loads(Path(cases_file).read_text()):
        distributed_config = DistributedConfig(**case["distributed_config"])
        model = AutoModelForCausalLM.from_pretrained(
            case["model"], distributed_config=distributed_config, trust_remote_code=True
        )
        reference = AutoModelForCausalLM.from_pretrained(case["model"], trust_remote_code=True)
        for m in (model, reference):
            m.set_experts_implementation("eager")
        ids = torch.arange(24).view(2, 12) * 7 % model.config.vocab_size
        with torch.no_grad():
            logits_diff = (model(ids).logits - reference(ids).logits).abs().max().item()
        for m in (model, reference):
            m.train()(ids, labels=ids).loss.backward()
        experts = getattr(model.transformer.h[-1].mlp, "experts", None)
        results[case["name"]] = {
            "logits_diff": logits_diff,
            "grad_diff": max_grad_diff(model, reference),
            "sharded": sorted(
                {re.sub(r"\.\d+\.", ".*.", name) for name, param in model.named_parameters() if is_sharded(param)}
            ),
            # the experts this rank holds of the last layer (a MoE layer in the MoE model)
            "local_experts": None if experts is None else local(experts.up_proj).shape[0],
        }
    Path(out, f"result_{dist.get_rank()}.json").write_text(json.dumps(results))


# the fully_shard run: 2 micro-batches of 2 x 16 tokens per rank and step, a checkpoint after CHECKPOINT_STEP steps
ACCUMULATION, BATCH, SEQ_LEN, CHECKPOINT_STEP = 2, 2, 16, 2


def global_batch(step: int, world_size: int, vocab_size: int) -> list[torch.Tensor]:
    """Every micro-batch of the step, rank 0's first: the same on every rank and in a resumed run."""
    shape = (world_size * ACCUMULATION, BATCH, SEQ_LEN)
    return list(torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(step)))


def fully_shard_training(work: str, start: str, stop: str) -> None:
    """FSDP2 with torch's fully_shard, as accelerate_configs/fsdp2.yaml asks of Accelerate (each GPTMoEBlock, then
    the whole model), the optimizer of train_accelerate and a checkpoint as Accelerate's SHARDED_STATE_DICT writes it
    (torch.distributed.checkpoint) with a full model folder beside it (Checkpointer). From step 0 an unsharded
    replica takes the same steps on the global batch: the largest differences of loss, gradients and weights go to
    the result. From a later step the run resumes from the checkpoint."""
    from conftest import tiny_config
    from torch.distributed.checkpoint import load, save
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from checkpointing import save_model
    from modeling_gpt_moe import GPTMoEForCausalLM
    from train_accelerate import TrainArguments, configure_optimizer

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    work, start, stop = Path(work), int(start), int(stop)
    torch.manual_seed(0)
    model = GPTMoEForCausalLM(tiny_config()).train()
    model.set_experts_implementation("eager")
    reference = GPTMoEForCausalLM(model.config).train()  # for the first run only: the unsharded twin
    reference.load_state_dict(model.state_dict())
    reference.set_experts_implementation("eager")
    mesh = init_device_mesh("cpu", (world_size,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    args = TrainArguments(max_lr=1e-2, weight_decay=0.1)
    optimizer = configure_optimizer(model, args, torch.device("cpu"))
    reference_optimizer = configure_optimizer(reference, args, torch.device("cpu"))
    checkpoint = work / f"model_{CHECKPOINT_STEP:05d}"
    if start > 0:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        load(state, checkpoint_id=checkpoint / "training_state")
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    diffs = {"loss": 0.0, "grad": 0.0}
    for step in range(start, stop):
        micro_batches = global_batch(step, world_size, model.config.vocab_size)
        loss = torch.zeros(())
        for i, ids in enumerate(micro_batches[rank * ACCUMULATION : (rank + 1) * ACCUMULATION]):
            model.set_requires_gradient_sync(i == ACCUMULATION - 1)  # reduce-scatter once per step
            out = model(ids, labels=ids)
            (out.loss / ACCUMULATION).backward()  # FSDP then averages over the ranks
            loss += out.loss.detach() / ACCUMULATION
        dist.all_reduce(loss)
        if start == 0:
            reference_loss = sum(reference(ids, labels=ids).loss for ids in micro_batches) / len(micro_batches)
            reference_loss.backward()
            diffs["loss"] = max(diffs["loss"], abs(loss.item() / world_size - reference_loss.item()))
            diffs["grad"] = max(diffs["grad"], max_grad_diff(model, reference))
            torch.nn.utils.clip_grad_norm_(reference.parameters(), args.grad_clip)
            reference_optimizer.step()
            reference_optimizer.zero_grad()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad()

        if step + 1 == CHECKPOINT_STEP:
            full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                saved = dict(full_state)  # save_pretrained empties the dict it is given
                save_model(model, checkpoint, full_state)
            model_state, optimizer_state = get_state_dict(model, optimizer)
            save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=checkpoint / "training_state")

    final = {name: full(param).detach() for name, param in model.named_parameters()}
    if start == 0:
        weights = {name: param.detach() for name, param in reference.named_parameters()}
        # relative: AdamW magnifies rounding on parameters with near-zero gradients
        diffs["weight"] = max(
            ((final[name] - weights[name]).norm() / weights[name].norm().clamp(min=1e-12)).item() for name in final
        )
    if start == 0 and rank == 0:  # the only rank the full state dict was gathered to
        loaded = GPTMoEForCausalLM.from_pretrained(checkpoint).state_dict()
        diffs["loaded"] = max((loaded[name] - tensor).abs().max().item() for name, tensor in saved.items())
    if rank == 0:
        save_file({name: tensor.contiguous() for name, tensor in final.items()}, work / f"final_{start}.safetensors")
    Path(work, f"result_from_{start}_{rank}.json").write_text(json.dumps(diffs))


if __name__ == "__main__":
    {"sharded_models": sharded_models, "fully_shard": fully_shard_training}[sys.argv[1]](*sys.argv[2:])
