"""Muon for the hidden weight matrices, the experts' (E, out, in) stacks included; AdamW for the rest.

Muon (Keller Jordan, 2024; the modded-nanogpt speedrun) updates a weight matrix with its Nesterov momentum
orthogonalised by five Newton-Schulz iterations: the update keeps the momentum's singular vectors and sets its
singular values to about 1, so the rare directions of a matrix learn as fast as the dominant ones. It is meant for
the matrices inside the network: embeddings, the output layer, biases and norms stay with AdamW, as in
modded-nanogpt and Moonlight ("Muon is Scalable for LLM Training", arXiv 2502.16982).

torch.optim.Muon (torch >= 2.9) updates 2D matrices and is used for them as it is. What it lacks is written here:

- `StackedMuon`: the same update for stacks of matrices (E, out, in), each of the E orthogonalised on its own, all
  at once in batched matmuls (`orthogonalise`). For every expert it is the update torch's Muon gives a matrix.
- `CombinedOptimizer`: torch's Muon, StackedMuon and AdamW stepped, scheduled and checkpointed as one optimizer.

Scaling: Moonlight's RMS matching (torch's `adjust_lr_fn="match_rms_adamw"`). The orthogonalised update of an
(A, B) matrix has RMS about 1/sqrt(max(A, B)); scaled by 0.2 * sqrt(max(A, B)) its RMS is 0.2, that of a typical
AdamW update, and weight decay is decoupled (lr * weight_decay per step) as in AdamW. So one learning rate and one
schedule drive both optimizers, and a recipe's max_lr and weight_decay mean what they mean with AdamW (Moonlight,
section 2.2). Keller's original scaling, sqrt(max(1, A/B)), wants a learning rate 30-100x AdamW's: a second lr
and schedule in every recipe, and runs that no longer compare at equal settings.

Distributed: the update is a function of the all-reduced gradient and of state that is the same on every process,
so under DDP each process computes the same update (redundantly; modded-nanogpt splits the matrices among ranks).
Sharded parameters (FSDP, DeepSpeed ZeRO) are refused by train_accelerate.py: Newton-Schulz needs whole matrices.
"""

import math
from collections import ChainMap
from collections.abc import Iterable

import torch
from torch import nn

# torch.optim.Muon's defaults (Keller Jordan's quintic: the steepest slope at zero that still lands near 1)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
EPS = 1e-7


def orthogonalise(
    stack: torch.Tensor, coefficients: tuple[float, float, float] = NS_COEFFICIENTS, steps: int = NS_STEPS, eps=EPS
) -> torch.Tensor:
    """U S' V^T with S' in about [0.7, 1.2] for each (out, in) matrix U S V^T of an (E, out, in) stack, in bf16.

    torch.optim.Muon's quintic Newton-Schulz iteration with its bf16 arithmetic, batched over the stack: each
    matrix is scaled by its own norm, and the same fused multiply-adds (baddbmm for addmm) give the same result.
    """
    a, b, c = coefficients
    x = stack.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the (min, min) Gram matrix
        x = x.mT
    # Frobenius norm >= spectral norm: every singular value starts in (0, 1], where the iteration converges
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT  # (E, min, min)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b G + c G^2) x
    return x.mT if tall else x


def lr_ratio(shape: torch.Size, adjust_lr_fn: str | None) -> float:
    """The factor torch.optim.Muon applies to the learning rate of an (A, B) matrix's update."""
    rows, cols = shape
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))  # RMS 0.2, as AdamW's update (Moonlight)
    return math.sqrt(max(1.0, rows / cols))  # "original" (Keller Jordan)


class StackedMuon(torch.optim.Optimizer):
    """torch.optim.Muon for stacks of matrices (E, out, in), such as the experts of an MoE layer.

    The same hyperparameters, defaults and state (`momentum_buffer`) as torch's Muon; each matrix of a stack gets
    the update torch's Muon would give it alone, but the E orthogonalisations run as one batched computation.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = EPS,
        ns_steps: int = NS_STEPS,
        adjust_lr_fn: str | None = None,
    ):
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"adjust_lr_fn must be None, 'original' or 'match_rms_adamw', not {adjust_lr_fn!r}")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for param in group["params"]:
                if param.dim() != 3:
                    raise ValueError(f"StackedMuon takes (E, out, in) stacks, not shape {tuple(param.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            momentum, lr = group["momentum"], group["lr"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad, state = param.grad, self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(grad, 1 - momentum)
                update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                update = orthogonalise(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-lr * lr_ratio(param.shape[1:], group["adjust_lr_fn"]))
        return loss


class CombinedOptimizer(torch.optim.Optimizer):
    """Optimizers of disjoint parameters used as one: `param_groups` lists the groups of all (a schedule that sets
    group["lr"] reaches each), `step` and `zero_grad` call each, and the state dict holds each one's, in order."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        # Optimizer.__init__ would keep its own list of the groups; each optimizer's load_state_dict replaces its
        # group dicts, and that list would go stale. The groups and states stay the optimizers' own.
        self.optimizers = list(optimizers)
        self.defaults = {}

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @property
    def state(self) -> ChainMap:
        return ChainMap(*(optimizer.state for optimizer in self.optimizers))

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("optimizers")
        if saved is None or len(saved) != len(self.optimizers):
            raise ValueError(f"expected the state of {len(self.optimizers)} optimizers (a CombinedOptimizer's)")
        for optimizer, state in zip(self.optimizers, saved, strict=True):
            optimizer.load_state_dict(state)


def muon_with_adamw(
    matrices: list[nn.Parameter], adamw: torch.optim.Optimizer, lr: float, weight_decay: float, momentum: float = 0.95
) -> CombinedOptimizer:
    """torch.optim.Muon for the 2D matrices, StackedMuon for the 3D stacks and `adamw` for every other parameter,
    as one optimizer; Muon's updates RMS-matched to AdamW's, so lr and weight_decay mean the same for both."""
    muon = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True, adjust_lr_fn="match_rms_adamw")
    flat, stacked = [p for p in matrices if p.dim() == 2], [p for p in matrices if p.dim() == 3]
    if len(flat) + len(stacked) != len(matrices):
        raise ValueError("Muon takes matrices (out, in) and stacks of them (E, out, in) only")
    optimizers = [torch.optim.Muon(flat, **muon)] if flat else []
    optimizers += [StackedMuon(stacked, **muon)] if stacked else []
    return CombinedOptimizer([*optimizers, adamw])
