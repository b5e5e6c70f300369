"""Checkpoints: a Hub-ready model folder per save, with the full training state inside it.

    log/model_00500/                   AutoModelForCausalLM.from_pretrained(it, trust_remote_code=True)
        config.json, model.safetensors, generation_config.json
        configuration_gpt_moe.py, modeling_gpt_moe.py   (remote code, found through config.json's auto_map)
        tokenizer.json, tokenizer_config.json
        README.md                      model card: training configuration and last metrics
        training_state/                what --resume_from_checkpoint needs; never uploaded to the Hub
            model.safetensors, optimizer.bin, random_states_<rank>.pkl   (accelerator.save_state)
            trainer_state.json         step, data position, metrics, arguments

A checkpoint is written under `model_00500.tmp` and renamed when complete, so a folder with the
final name is always whole. The output folder must be on a filesystem all processes share. A write that fails
(a full disk, a read-only folder) stops every process with one line naming the last complete checkpoint.
"""

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from concurrent.futures import Future, wait
from pathlib import Path

import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object
from huggingface_hub import HfApi
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers import PreTrainedModel, PreTrainedTokenizerBase

if __package__:  # installed: these modules are the package gpt_moe
    from .command_line import write_failed, write_fault
    from .training_metrics import active_parameters
else:  # a script or module of a clone, whose root is on sys.path
    from command_line import write_failed, write_fault
    from training_metrics import active_parameters

TRAINING_STATE = "training_state"
TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINT_NAME = re.compile(r"model_(\d+)")
METRIC_NAMES = {"train": "train loss", "val": "validation loss", "hella": "HellaSwag acc_norm"}

# accelerate warns on every save that the tied lm_head is stored once; that is intended
logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says why and what to do."""


class WriteError(Exception):
    """An output of the run that could not be written (a full disk, a read-only folder); raised on every process
    alike, with one line naming it, the cause, the last complete checkpoint and what to do."""


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"model_{step:05d}"


def save_model(model: PreTrainedModel, folder: Path, state_dict: dict) -> None:
    """save_pretrained with the full `state_dict`, also for a model sharded by FSDP2's fully_shard.

    fully_shard gives the model a subclass of its class, defined in torch: save_pretrained would copy that
    subclass's source files (torch's) into the folder as the model's code, and name it in auto_map.
    """
    sharded_class = type(model)
    model.__class__ = next(cls for cls in sharded_class.__mro__ if not issubclass(cls, FSDPModule))
    try:
        model.save_pretrained(folder, state_dict=state_dict)
    finally:
        model.__class__ = sharded_class


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in output_dir, oldest first."""
    if not Path(output_dir).is_dir():
        return []
    found = [p for p in Path(output_dir).iterdir() if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.fullmatch(p.name).group(1)))


def what_was_kept(output_dir: str | Path) -> tuple[str, str]:
    """What a run that stops on a fault leaves: the last complete checkpoint, and how to go on from it."""
    try:
        checkpoints = list_checkpoints(output_dir)
    except OSError as error:  # on the way to a one-line report on every process: this must not raise
        return f"the checkpoints in {output_dir} could not be listed ({error.strerror})", "check the folder"
    if not checkpoints:
        return "no checkpoint yet", "run the command again"
    step = int(CHECKPOINT_NAME.fullmatch(checkpoints[-1].name).group(1))
    kept = f"the last complete checkpoint is {checkpoints[-1]} (step {step})"
    return kept, "resume with --resume_from_checkpoint latest"


def write_together(accelerator: Accelerator, write: Callable[[], None], target: Path, output_dir: str | Path) -> None:
    """Call `write`, this process's part of writing `target`, then raise the same WriteError on every process if
    it failed on any: one process stopping alone would leave the others waiting for it in their next collective.
    Returns when every process has written its part (the exchange of outcomes is an all-gather). Any other error
    is a bug, raised at once."""
    line = None
    try:
        write()
    except Exception as error:
        fault = write_fault(error)
        if fault is None:
            raise
        line = write_failed(target, fault, *what_was_kept(output_dir))
    failed = [line for line in gather_object([line]) if line]
    if failed:
        raise WriteError(failed[0])


def resolve_checkpoint(output_dir: str | Path, spec: str) -> Path | None:
    """The folder `--resume_from_checkpoint spec` names: `latest` is the newest one in output_dir
    (None when there is none yet, so the same command starts and restarts a preemptible job)."""
    if spec == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(spec)
    if not (path / TRAINING_STATE / TRAINER_STATE_FILE).is_file():
        raise CheckpointError(
            f"{path} is not a checkpoint of this script (no {TRAINING_STATE}/{TRAINER_STATE_FILE}); "
            f"pass a model_<step> folder or 'latest'"
        )
    return path


class Checkpointer:
    """Saves the whole run as a checkpoint folder, restores it, prunes old ones and pushes them to the Hub.

    Every process must call `save` and `restore`: the state is gathered from, and given back to, all of them.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        train_loader,
        config: dict,
        log=print,
    ):
        """config: every argument of the run (output_dir, save_total_limit, push_to_hub, hub_model_id,
        total_batch_size are read here); it also goes into the model card and the trainer state."""
        self.accelerator, self.model, self.tokenizer, self.train_loader = accelerator, model, tokenizer, train_loader
        self.config, self.log = config, log
        self.output_dir, self.save_total_limit = config["output_dir"], config["save_total_limit"]
        hub_model_id = config["hub_model_id"] if config["push_to_hub"] else None
        self.repo_name = hub_model_id or "gpt-moe"
        self.uploader = HubUploader(hub_model_id, log) if hub_model_id and accelerator.is_main_process else None
        unwrapped = accelerator.unwrap_model(model)
        self.param_counts = {
            "total": sum(p.numel() for p in unwrapped.parameters()),
            "active": active_parameters(unwrapped),
        }

    def save(self, step: int, metrics: dict) -> Path:
        """Write checkpoint model_<step> (the state after `step` optimizer steps) and return its path. A write that
        fails raises WriteError on every process, once the partial folder is removed."""
        accelerator, path = self.accelerator, checkpoint_path(self.output_dir, step)
        partial = path.with_name(path.name + ".tmp")
        if accelerator.is_main_process and partial.exists():
            shutil.rmtree(partial)  # left by a run killed while saving
        accelerator.wait_for_everyone()
        # the full state dict: under FSDP this gathers the shards, so every process takes part
        state_dict = accelerator.get_state_dict(self.model)
        try:
            # two rounds, each returning when every process has written its part: every process enters save_state
            # (collective under FSDP) only if the model folder was written, and the main process renames the folder
            # only once the others have written their random states (and shards) into it
            write_together(
                accelerator,
                lambda: self.write_model_folder(partial, step, metrics, state_dict),
                partial,
                self.output_dir,
            )
            write_together(
                accelerator, lambda: self.write_training_state(partial, step, metrics), partial, self.output_dir
            )
        except WriteError:
            if accelerator.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)  # it holds space the user is short of
            raise
        if accelerator.is_main_process:
            os.replace(partial, path)
            self.log(f"saved {path}")
            if self.save_total_limit:
                for old in list_checkpoints(self.output_dir)[: -self.save_total_limit]:
                    shutil.rmtree(old)
            if self.uploader:
                self.uploader.upload(path)
        accelerator.wait_for_everyone()
        return path

    def write_model_folder(self, folder: Path, step: int, metrics: dict, state_dict: dict) -> None:
        """The Hub model folder: weights, code, tokenizer and model card, written by the main process."""
        accelerator = self.accelerator
        if accelerator.is_main_process:
            save_model(accelerator.unwrap_model(self.model), folder, state_dict)
            self.tokenizer.save_pretrained(folder)
            tokens = step * self.config["total_batch_size"]
            card = model_card(self.repo_name, step, tokens, metrics, self.config, self.param_counts)
            (folder / "README.md").write_text(card)

    def write_training_state(self, folder: Path, step: int, metrics: dict) -> None:
        """What resuming needs: every process its training state (its random states; its shards under FSDP), the
        main process the trainer state."""
        accelerator = self.accelerator
        accelerator.save_state(folder / TRAINING_STATE)
        if accelerator.is_main_process:
            trainer_state = {
                "step": step,
                "world_size": accelerator.num_processes,
                # the loader's position is the same on every process (see fineweb_shards.ShardLoader)
                "train_loader": self.train_loader.state_dict(),
                "metrics": metrics,
                "config": self.config,
            }
            (folder / TRAINING_STATE / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n")

    def restore(self, path: Path) -> int:
        """Load model, optimizer, RNG and data position from a checkpoint; returns the step to continue from."""
        trainer_state = json.loads((path / TRAINING_STATE / TRAINER_STATE_FILE).read_text())
        # one optimizer's state does not load into another (checkpoints from before --optimizer are AdamW's)
        saved, wanted = trainer_state["config"].get("optimizer", "adamw"), self.config.get("optimizer", "adamw")
        if saved != wanted:
            raise CheckpointError(
                f"cannot resume from {path}: it was trained with --optimizer {saved}; resume with it"
            )
        try:
            self.train_loader.load_state_dict(trainer_state["train_loader"])
        except ValueError as error:
            raise CheckpointError(
                f"cannot resume from {path}: {error}; resume with the data, batch settings and number of "
                f"processes ({trainer_state['world_size']}) it was saved with"
            ) from None
        self.accelerator.load_state(path / TRAINING_STATE)
        self.log(f"resumed from {path} at step {trainer_state['step']}")
        return trainer_state["step"]

    def close(self) -> None:
        """Wait for the Hub uploads still queued."""
        if self.uploader:
            self.uploader.close()


def model_card(repo_name: str, step: int, tokens: int, metrics: dict, config: dict, param_counts: dict) -> str:
    """A Hub model card: what the model is, how to load it, its last metrics and its training configuration."""
    metric_rows = "\n".join(f"| {METRIC_NAMES.get(name, name)} | {value:.4f} |" for name, value in metrics.items())
    return f"""---
library_name: transformers
license: mit
tags:
- gpt_moe
- mixture-of-experts
- text-generation
---

# {repo_name}

A GPT-2-style language model with Mixture-of-Experts feed-forward layers, pretrained with GPT-MoE's
`train_accelerate.py`: {step:,} optimizer steps, {tokens:,} tokens.
{param_counts["total"]:,} parameters, {param_counts["active"]:,.0f} active per token.

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_name}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{repo_name}", trust_remote_code=True)
inputs = tokenizer("Hello, I'm a language model,", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32, do_sample=True, top_k=50)[0]))
```

## Last metrics (step {step})

| metric | value |
| --- | --- |
{metric_rows}

Validation loss is the mean cross-entropy (nats per token) on the validation shards; HellaSwag is
acc_norm in the completion style of build-nanogpt.

## Training configuration

```yaml
{yaml.safe_dump(config, sort_keys=False).strip()}
```
"""


class HubUploader:
    """Uploads checkpoint folders to a Hub model repo in the background, in order, on HfApi's own queue
    (`run_as_future`, the mechanism behind `upload_folder(..., run_as_future=True)`: one thread, jobs in order).

    Training never waits for an upload nor stops when one fails (offline, no token, no access): the failure is one
    warning line. `close()` waits for the uploads still queued.
    """

    def __init__(self, repo_id: str, log=print):
        self.repo_id, self.log = repo_id, log
        self.api = HfApi()
        self.pushes: list[Future] = []
        self.repo_created = False

    def upload(self, folder: Path) -> None:
        # creating the repo and uploading are one job, not two futures: a Hub out of reach then fails once per
        # checkpoint, in one line, and the line is written before close() stops waiting
        self.pushes.append(self.api.run_as_future(self.push, folder))

    def close(self) -> None:
        wait(self.pushes)

    def push(self, folder: Path) -> None:
        try:
            if not self.repo_created:
                self.api.create_repo(self.repo_id, repo_type="model", exist_ok=True)
                self.repo_created = True
            self.api.upload_folder(
                repo_id=self.repo_id,
                folder_path=folder,
                ignore_patterns=[f"{TRAINING_STATE}/*"],
                commit_message=f"Upload {folder.name}",
            )
            self.log(f"pushed {folder.name} to https://huggingface.co/{self.repo_id}")
        except Exception as error:  # whatever the Hub or the network raise, training goes on
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            self.log(f"warning: push of {folder.name} to {self.repo_id} failed: {first_line}")
