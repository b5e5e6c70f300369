"""Load balancing: the aux-loss-free expert bias and the global-batch load-balancing loss, in one process.

The multi-process side (1 vs 2 processes, resume, remote code with a non-zero bias) is covered by the
training run of test_train.py, which trains with both.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from test_modeling import random_ids

from convert_gpt2_to_gpt_moe import convert_gpt2
from modeling_gpt_moe import GPTMoERouter


def one_moe_layer(**overrides):
    """A 2-layer model whose layer 1 is a MoE of 4 experts, top-2 (layer 0 dense)."""
    return tiny_model(seed=3, mlp_only_layers=[0], **overrides)


def test_bias_update_is_the_sign_rule_centred():
    model = one_moe_layer(router_bias_update_rate=0.1)
    model.routed_tokens = torch.tensor([[10.0, 2.0, 4.0, 0.0]])  # mean 4: too many, too few, balanced, too few
    counts = model.finish_step()
    # 0.1 * sign(4 - load) = (-0.1, 0.1, 0, 0.1), minus its mean 0.025
    torch.testing.assert_close(model.routers()[0].expert_bias, torch.tensor([-0.125, 0.075, -0.025, 0.075]))
    torch.testing.assert_close(counts, torch.tensor([[10.0, 2.0, 4.0, 0.0]]))
    assert model.routed_tokens is None  # the next step counts afresh
    model.routed_tokens = torch.tensor([[10.0, 2.0, 4.0, 0.0]])
    model.finish_step(update_bias=False)  # a skipped step leaves the bias alone
    torch.testing.assert_close(model.routers()[0].expert_bias, torch.tensor([-0.125, 0.075, -0.025, 0.075]))


def test_training_forwards_count_the_top_k_assignments_of_real_tokens():
    model = one_moe_layer().train()
    ids, mask = random_ids(2, 12), torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    out = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    chosen = out.router_logits[0].softmax(-1).topk(2, dim=-1).indices[mask.flatten().bool()]
    expected = torch.bincount(chosen.flatten(), minlength=4).float()
    torch.testing.assert_close(model.finish_step(), expected[None])


def test_bias_steers_which_experts_are_chosen_but_not_their_weights():
    torch.manual_seed(0)
    router = GPTMoERouter(one_moe_layer(norm_topk_prob=False).config)
    torch.nn.init.normal_(router.weight, std=0.5)
    hidden = torch.randn(64, 32)
    _, weights, index = router(hidden)
    router.expert_bias[0] = 10.0
    logits, biased_weights, biased_index = router(hidden)
    probs = F.softmax(logits, dim=-1)
    assert (biased_index == 0).any(dim=-1).all() and not (index == 0).any(dim=-1).all()
    torch.testing.assert_close(biased_weights, probs.gather(-1, biased_index))  # unbiased probabilities
    unchanged = (biased_index.sort(-1).values == index.sort(-1).values).all(-1)
    torch.testing.assert_close(biased_weights.sort(-1).values[unchanged], weights.sort(-1).values[unchanged])


def test_evaluation_and_generation_leave_the_bias_alone():
    model = one_moe_layer(router_bias_update_rate=0.1)
    ids = random_ids(2, 8)
    with torch.no_grad():
        model(ids, labels=ids)  # eval mode (tiny_model)
    model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert model.routed_tokens is None and model.finish_step() is None
    assert torch.equal(model.routers()[0].expert_bias, torch.zeros(4))
    model.train()(ids, labels=ids)
    model.finish_step()
    assert model.routers()[0].expert_bias.abs().sum() > 0


@pytest.mark.parametrize("scope", ["micro_batch", "global_batch"])
def test_aux_loss_takes_its_expert_shares_from_the_scope(scope):
    """The second micro-step's loss: f from its own batch, or from both micro-steps so far; 1.0 at balance."""
    model = one_moe_layer(router_aux_loss_scope=scope).train()
    first, second = random_ids(2, 12, seed=1), random_ids(2, 12, seed=2)
    counts_first = assignment_counts_of(model(first, labels=first, output_router_logits=True))
    out = model(second, labels=second, output_router_logits=True)
    counts_second = assignment_counts_of(out)
    counts = counts_first + counts_second if scope == "global_batch" else counts_second
    expected = 4 * torch.sum(counts / counts.sum() * out.router_logits[0].softmax(-1).mean(0))
    torch.testing.assert_close(out.aux_loss, expected)
    torch.testing.assert_close(model.finish_step(), (counts_first + counts_second)[None])


def assignment_counts_of(out) -> torch.Tensor:
    chosen = out.router_logits[0].softmax(-1).topk(2, dim=-1).indices
    return torch.bincount(chosen.flatten(), minlength=4).float()


def test_upcycled_gpt2_stays_exact_with_both_balancing_options(tiny_gpt2):
    moe = convert_gpt2(tiny_gpt2, num_experts=4, num_experts_per_tok=2)
    moe.config.router_aux_loss_scope, moe.config.router_bias_update_rate = "global_batch", 0.1
    ids = random_ids(3, 24)
    moe.train()(ids, labels=ids)
    moe.finish_step()  # the bias moves, choosing other (identical) experts
    assert all(router.expert_bias.abs().sum() > 0 for router in moe.routers())
    with torch.no_grad():
        max_diff = (tiny_gpt2(ids).logits - moe.eval()(ids).logits).abs().max().item()
    assert max_diff < 1e-4
