"""GPTMoE against references: HF's GPT-2, a naive float64 MoE, itself under other backends."""

import inspect
import math
import re

import pytest
import torch
import torch.nn.functional as F
import transformers
from accelerate.hooks import ModelHook, add_hook_to_module
from conftest import tiny_config, tiny_model
from packaging import version
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

import modeling_gpt_moe
from configuration_gpt_moe import GPTMoEConfig
from convert_gpt2_to_gpt_moe import convert_gpt2
from modeling_gpt_moe import GPTMoEForCausalLM, GPTMoERouter, load_balancing_loss, router_z_loss


def random_ids(batch: int, length: int, seed: int = 1, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, input_ids, **kwargs) -> torch.Tensor:
    return model.generate(input_ids, max_new_tokens=10, do_sample=False, pad_token_id=0, **kwargs)


def left_padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return input_ids, attention_mask


# ---------------------------------------------------------------- equivalence with GPT-2


@pytest.mark.parametrize("num_experts, top_k", [(None, 1), (4, 2), (4, 1)])
def test_converted_gpt2_gives_same_logits_and_greedy_tokens(tiny_gpt2, num_experts, top_k):
    ours = convert_gpt2(tiny_gpt2, num_experts=num_experts, num_experts_per_tok=top_k).eval()
    assert ours.config.use_moe == (num_experts is not None)
    ids = random_ids(3, 24)
    with torch.no_grad():
        max_diff = (tiny_gpt2(ids).logits - ours(ids).logits).abs().max().item()
    assert max_diff < 1e-4
    assert torch.equal(greedy(tiny_gpt2, ids[:, :5]), greedy(ours, ids[:, :5]))


def test_upcycled_loss_is_dense_loss_plus_router_terms(tiny_gpt2):
    dense = convert_gpt2(tiny_gpt2).eval()
    moe = convert_gpt2(tiny_gpt2, num_experts=4, num_experts_per_tok=2).eval()
    ids = random_ids(2, 16)
    with torch.no_grad():
        dense_out, moe_out = dense(ids, labels=ids), moe(ids, labels=ids)
    assert dense_out.aux_loss is None
    router_terms = 0.01 * moe_out.aux_loss + 0.001 * moe_out.z_loss
    torch.testing.assert_close(moe_out.loss, dense_out.loss + router_terms, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- generation

# transformers 5.24 renamed the KV cache argument of forward() and the field of the outputs
RENAMED = version.parse(transformers.__version__) >= version.parse("5.24")
GENERATE_CACHE_NAME = "cache" if RENAMED else "past_key_values"


def cache_of(output):
    """The KV cache a model or generate() output holds, read under the installed transformers' name."""
    return getattr(output, GENERATE_CACHE_NAME)


@pytest.mark.parametrize("use_moe", [False, True])
def test_generate_passes_the_cache_under_the_installed_name_and_reads_it_back(use_moe):
    model = tiny_model(seed=2, use_moe=use_moe)
    assert modeling_gpt_moe.CACHE_NAME == GENERATE_CACHE_NAME
    received = []
    model.register_forward_pre_hook(lambda module, args, kwargs: received.append(dict(kwargs)), with_kwargs=True)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    out = model.generate(random_ids(1, 5), return_dict_in_generate=True, **kwargs)
    assert len(received) == 4
    caches = [kwargs.get(GENERATE_CACHE_NAME) for kwargs in received]
    assert all(isinstance(cache, Cache) for cache in caches) and all(cache is caches[0] for cache in caches)
    assert [kwargs["input_ids"].shape[1] for kwargs in received] == [5, 1, 1, 1]  # decoding steps see one token
    assert cache_of(out).get_seq_length() == 8  # the prompt and the first three new tokens


@pytest.mark.parametrize("use_moe", [False, True])
def test_cached_logits_equal_uncached_logits(use_moe):
    model = tiny_model(seed=2, use_moe=use_moe)
    ids = random_ids(2, 9)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        prefix = model(ids[:, :6], use_cache=True)
        step = model(ids[:, 6:], **{GENERATE_CACHE_NAME: cache_of(prefix)}, use_cache=True)
    assert cache_of(step).get_seq_length() == 9
    torch.testing.assert_close(step.logits, full[:, 6:], atol=1e-5, rtol=0)
    torch.testing.assert_close(prefix.logits, full[:, :6], atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_moe", [False, True])
def test_generate_with_and_without_cache_and_left_padding(use_moe):
    model = tiny_model(seed=2, use_moe=use_moe)
    rows = [[5, 17, 42, 8, 9, 60, 3], [33, 2, 71], [11, 12, 13, 14]]
    alone = [greedy(model, torch.tensor([row]))[0, len(row) :] for row in rows]
    for row, expected in zip(rows, alone, strict=True):
        uncached = greedy(model, torch.tensor([row]), use_cache=False)[0, len(row) :]
        assert torch.equal(uncached, expected)
    input_ids, attention_mask = left_padded(rows)
    for cache_implementation in ("dynamic", "static"):
        batch = greedy(model, input_ids, attention_mask=attention_mask, cache_implementation=cache_implementation)
        for generated, expected in zip(batch[:, input_ids.shape[1] :], alone, strict=True):
            assert torch.equal(generated, expected), cache_implementation


@pytest.mark.parametrize("use_moe", [False, True])
def test_beam_search_with_cache_equals_without(use_moe):
    model = tiny_model(seed=3, use_moe=use_moe)
    ids = random_ids(2, 6)
    kwargs = dict(num_beams=3, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs))


@pytest.mark.parametrize("use_moe", [False, True])
def test_assisted_decoding_equals_greedy(use_moe):
    model, assistant = tiny_model(seed=4, use_moe=use_moe), tiny_model(seed=5, n_layer=1)
    ids = random_ids(1, 6)
    assert torch.equal(greedy(model, ids, assistant_model=assistant), greedy(model, ids, use_cache=False))


@pytest.mark.parametrize("use_moe", [False, True])
def test_generate_continues_from_a_returned_cache(use_moe):
    model = tiny_model(seed=4, use_moe=use_moe)
    ids = random_ids(2, 5)
    first = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    continued = model.generate(
        first.sequences, **{GENERATE_CACHE_NAME: cache_of(first)}, max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    assert torch.equal(continued, greedy(model, ids, use_cache=False))


@pytest.mark.parametrize("use_moe", [False, True])
def test_generate_from_inputs_embeds_equals_from_input_ids(use_moe):
    model = tiny_model(seed=5, use_moe=use_moe)
    ids = random_ids(2, 5)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    mask = torch.ones_like(ids)  # the prompt may hold token 0, the pad token here
    from_embeds = model.generate(
        inputs_embeds=embeds, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0
    )
    from_ids = greedy(model, ids, attention_mask=mask, use_cache=False)
    assert torch.equal(from_embeds, from_ids[:, 5:])  # only the new tokens come back


@pytest.mark.parametrize("use_moe", [False, True])
def test_generate_returns_scores_hidden_states_and_attentions(use_moe):
    model = tiny_model(seed=6, use_moe=use_moe)
    model.set_attn_implementation("eager")
    out = model.generate(
        random_ids(2, 5),
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
        output_hidden_states=True,
        output_attentions=True,
    )
    assert out.sequences.shape == (2, 9)
    assert len(out.scores) == 4 and out.scores[0].shape == (2, 96)
    assert len(out.hidden_states) == 4 and len(out.hidden_states[0]) == 3  # embeddings + 2 blocks
    assert out.hidden_states[0][0].shape == (2, 5, 32) and out.hidden_states[-1][-1].shape == (2, 1, 32)
    assert len(out.attentions) == 4 and len(out.attentions[-1]) == 2
    assert out.attentions[0][0].shape == (2, 4, 5, 5) and out.attentions[-1][1].shape == (2, 4, 1, 8)


def test_compiled_static_cache_decoding_matches_eager():
    # what _can_compile_fullgraph declares: decoding with a static cache compiles as one graph
    model = tiny_model(seed=6)
    ids = random_ids(2, 4)
    compiled = torch.compile(model, fullgraph=True)
    logits = {}
    for name, forward in (("eager", model), ("compiled", compiled)):
        cache = StaticCache(config=model.config, max_cache_len=16)
        tokens, steps = ids, []
        with torch.no_grad():
            for position in range(4, 8):
                step_ids = tokens if position == 4 else tokens[:, -1:]
                positions = torch.arange(position - step_ids.shape[1], position).expand(2, -1)
                out = forward(step_ids, position_ids=positions, **{GENERATE_CACHE_NAME: cache}, use_cache=True)
                steps.append(out.logits[:, -1])
                tokens = torch.cat([tokens, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        logits[name] = torch.stack(steps)
    torch._dynamo.reset()
    torch.testing.assert_close(logits["compiled"], logits["eager"], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- backends agree


def test_experts_implementations_agree_on_outputs_and_gradients():
    model = tiny_model(seed=7).train()
    ids = random_ids(2, 16)
    results = {}
    for implementation in ("eager", "grouped_mm", "batched_mm"):
        model.set_experts_implementation(implementation)
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[implementation] = (out.logits.detach(), grads)
    ref_logits, ref_grads = results["eager"]
    assert any(".experts." in name for name in ref_grads) and any(".router." in name for name in ref_grads)
    for implementation in ("grouped_mm", "batched_mm"):
        logits, grads = results[implementation]
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_compiled_forward_matches_eager():
    # what train_accelerate.py --compile and bench/gpu_throughput.py run: torch.compile(model), loss and backward,
    # with the default experts implementation (grouped_mm; the eager one compiles too but takes 40 s here)
    ids = random_ids(2, 16, seed=3)
    results = {}
    for compiled in (False, True):
        model = tiny_model(seed=11).train()
        assert model.config._experts_implementation == "grouped_mm"
        forward = torch.compile(model) if compiled else model
        out = forward(ids, labels=ids)
        out.loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        results[compiled] = (out.loss.detach(), out.aux_loss.detach(), grads)
    torch._dynamo.reset()  # the next test compiles afresh
    (loss, aux_loss, grads), (ref_loss, ref_aux_loss, ref_grads) = results[True], results[False]
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux_loss, ref_aux_loss, atol=1e-6, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and any(".experts." in name for name in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("autocast", [False, True])
def test_training_forward_traces_as_one_graph(autocast):
    # a graph break costs speed silently: torch 2.11 could not trace torch.amp.is_autocast_available, and the
    # output-recording hooks, installed at the first call that records, broke the graph of the first training step
    model = tiny_model(seed=11).train()
    ids = random_ids(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        explanation = torch._dynamo.explain(model)(ids, labels=ids)
    torch._dynamo.reset()
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


class GroupedGemmDtypes(TorchDispatchMode):
    """Records the dtypes of the tensors every grouped GEMM receives."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "grouped_mm" in str(func):
            self.dtypes.update(arg.dtype for arg in args if isinstance(arg, torch.Tensor) and arg.is_floating_point())
        return func(*args, **(kwargs or {}))


def test_grouped_gemms_run_in_the_autocast_dtype():
    # transformers' grouped_mm is not an autocast op: fp32 weights would make it run in fp32
    # (on CUDA, a per-expert fallback loop). The block casts the weights as autocast would.
    ids = random_ids(2, 16)
    results = {}
    for implementation in ("eager", "grouped_mm"):
        model = tiny_model(seed=9).train()
        model.set_experts_implementation(implementation)
        with GroupedGemmDtypes() as recorded, torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, labels=ids)
        out.loss.backward()
        experts = model.transformer.h[0].mlp.experts
        assert experts.up_proj.dtype == experts.up_proj.grad.dtype == torch.float32
        results[implementation] = (out.logits.float(), experts.up_proj.grad, recorded.dtypes)
    assert results["grouped_mm"][2] == {torch.bfloat16}
    torch.testing.assert_close(results["grouped_mm"][0], results["eager"][0], atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(results["grouped_mm"][1], results["eager"][1], atol=1e-2, rtol=1e-2)


def test_autocast_leaves_float64_experts_alone_and_meta_runs():
    # autocast casts float32 only: a float64 model under bf16 autocast still computes in float64
    model = tiny_model(seed=9).double()
    model.set_experts_implementation("eager")
    ids = random_ids(2, 16)
    with torch.no_grad():
        expected = model(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids).logits
    assert logits.dtype == torch.float64
    torch.testing.assert_close(logits, expected, atol=1e-12, rtol=0)
    # meta tensors (shape probing) have no autocast state to ask about
    with torch.device("meta"):
        meta_model = GPTMoEForCausalLM(tiny_config())
    meta_model.set_experts_implementation("batched_mm")
    assert meta_model(ids.to("meta")).logits.shape == (2, 16, 96)


def test_forward_signature_has_no_self_plain_or_behind_an_accelerate_hook():
    # forward carries a precomputed __signature__ (generate() asks for it at every step)
    model = tiny_model()
    for _ in range(2):
        parameters = list(inspect.signature(model.forward).parameters)
        assert parameters[0] == "input_ids" and "labels" in parameters and "self" not in parameters
        add_hook_to_module(model, ModelHook())


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_eager_and_sdpa_attention_agree_with_padding(dtype, atol, padding_side):
    model = tiny_model(seed=8).to(dtype)
    rows = [[5, 17, 42, 8, 9, 60, 3], [33, 2, 71]]
    input_ids, attention_mask = left_padded(rows)
    if padding_side == "right":
        input_ids, attention_mask = input_ids.flip(1), attention_mask.flip(1)
        input_ids[1, :3] = torch.tensor(rows[1])
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = {}
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            out = model(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        logits[implementation] = out.logits[attention_mask.bool()].float()
    torch.testing.assert_close(logits["sdpa"], logits["eager"], atol=atol, rtol=0)


# ---------------------------------------------------------------- the MoE layer itself


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def naive_moe(block, x: torch.Tensor, top_k: int, norm_topk_prob: bool) -> torch.Tensor:
    """Token by token, expert by expert, in float64: what the MoE block must compute."""
    experts, out = block.experts, torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(block.router.weight @ x[t], dim=-1)
        chosen = sorted(range(len(probs)), key=lambda e: -probs[e].item())[:top_k]
        weights = probs[chosen] / (probs[chosen].sum() if norm_topk_prob else 1.0)
        for weight, e in zip(weights, chosen, strict=True):
            hidden = gelu_tanh(experts.up_proj[e] @ x[t] + experts.up_proj_bias[e])
            out[t] += weight * (experts.down_proj[e] @ hidden + experts.down_proj_bias[e])
        if block.shared_experts is not None:
            shared = block.shared_experts
            hidden = gelu_tanh(shared.c_fc.weight @ x[t] + shared.c_fc.bias)
            out[t] += shared.c_proj.weight @ hidden + shared.c_proj.bias
    return out


@pytest.mark.parametrize("top_k, norm_topk_prob, n_shared_experts", [(2, True, 0), (1, False, 1), (3, False, 0)])
def test_moe_block_matches_naive_float64_reference(top_k, norm_topk_prob, n_shared_experts):
    model = tiny_model(
        seed=9, num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob, n_shared_experts=n_shared_experts
    ).double()
    model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    block = model.transformer.h[0].mlp
    with torch.no_grad():
        for name, param in block.named_parameters():
            if "bias" in name:
                param.normal_(std=0.1)
        block.router.weight.normal_(std=1.0)  # confident routing: distinct top-k choices
        x = torch.randn(2, 9, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        out = block(x)
        expected = naive_moe(block, x.view(-1, 32), top_k, norm_topk_prob).view_as(x)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)


def test_every_token_reaches_its_experts_even_when_all_pick_one():
    """Dropless: a router that sends every token to expert 0 still processes every token."""
    model = tiny_model(seed=10, num_experts_per_tok=1, norm_topk_prob=False).double()
    model.set_experts_implementation("eager")
    block = model.transformer.h[0].mlp
    with torch.no_grad():
        block.router.weight.zero_()
        block.router.weight[0] = 10.0
        x = torch.rand(1, 40, 32, dtype=torch.float64) + 0.1  # positive: expert 0 wins for every token
        out = block(x)
        expected = naive_moe(block, x.view(-1, 32), 1, False).view_as(x)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("top_k, all_to_expert_0", [(2, False), (3, False), (1, True)])
def test_moe_block_gradients_match_naive_float64_reference(top_k, all_to_expert_0):
    """Input, router and every expert's gradients through the eager experts, and exact zeros for the experts
    that receive no token (there the saturated router's own gradient is near zero)."""
    model = tiny_model(seed=11, num_experts_per_tok=top_k, norm_topk_prob=False).double()
    model.set_experts_implementation("eager")
    block = model.transformer.h[0].mlp
    x = torch.randn(1, 24, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    if all_to_expert_0:
        with torch.no_grad():
            block.router.weight.zero_()
            block.router.weight[0] = 10.0
        x = x.abs() + 0.1
    grad_output = torch.randn_like(x)

    def gradients(forward) -> dict[str, torch.Tensor]:
        block.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_()
        (forward(inputs) * grad_output).sum().backward()
        return {"input": inputs.grad, **{name: p.grad for name, p in block.named_parameters()}}

    ours = gradients(block)
    expected = gradients(lambda inputs: naive_moe(block, inputs.view(-1, 32), top_k, False).view_as(inputs))
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], atol=1e-10, rtol=0, msg=name)
    if all_to_expert_0:
        for name in ("up_proj", "up_proj_bias", "down_proj", "down_proj_bias"):
            assert ours[f"experts.{name}"][1:].eq(0).all(), name


# ---------------------------------------------------------------- router losses


def cyclic_router_logits(num_tokens: int, num_experts: int, top_k: int) -> torch.Tensor:
    """Token t prefers experts t, t+1, ..., t+k-1 (mod E): every expert gets the same load."""
    logits = torch.zeros(num_tokens, num_experts)
    for t in range(num_tokens):
        for j in range(top_k):
            logits[t, (t + j) % num_experts] = 5.0 - j
    return logits


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_aux_loss_is_one_at_perfect_balance_for_any_k(top_k):
    uniform = (torch.zeros(64, 8),)
    balanced = (cyclic_router_logits(64, 8, top_k),)
    torch.testing.assert_close(load_balancing_loss(uniform, top_k), torch.tensor(1.0))
    torch.testing.assert_close(load_balancing_loss(balanced, top_k), torch.tensor(1.0))


def test_aux_loss_penalises_collapse_and_matches_hf_divided_by_k():
    collapsed = torch.full((32, 8), -10.0)
    collapsed[:, 0] = 10.0
    assert load_balancing_loss((collapsed,), 1).item() == pytest.approx(8.0, rel=1e-3)
    logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    for top_k in (1, 2, 3):
        hf = load_balancing_loss_func((logits,), num_experts=8, top_k=top_k)
        torch.testing.assert_close(load_balancing_loss((logits,), top_k), hf / top_k)


def test_router_losses_ignore_padding_and_average_layers():
    logits = [torch.randn(12, 4, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    mask = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1])
    real = [layer[mask.bool()] for layer in logits]
    for loss_fn in (lambda ls, m=None: load_balancing_loss(ls, 2, m), router_z_loss):
        torch.testing.assert_close(loss_fn(tuple(logits), mask), loss_fn(tuple(real)))
        per_layer = torch.stack([loss_fn((layer,)) for layer in real])
        torch.testing.assert_close(loss_fn(tuple(real)), per_layer.mean())
    z = torch.logsumexp(real[0], dim=-1).pow(2).mean()
    torch.testing.assert_close(router_z_loss((real[0],)), z)


@pytest.mark.parametrize("output_router_logits", [False, True])
def test_loss_is_cross_entropy_plus_weighted_router_losses(output_router_logits):
    model = tiny_model(seed=11, router_aux_loss_coef=0.3, router_z_loss_coef=0.02, mlp_only_layers=[0])
    ids = random_ids(2, 16)
    out = model(ids, labels=ids, output_router_logits=output_router_logits)
    cross_entropy = F.cross_entropy(out.logits[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss - cross_entropy, 0.3 * out.aux_loss + 0.02 * out.z_loss)
    assert out.aux_loss.item() > 0.9 and out.z_loss.item() > 0
    assert (out.router_logits is not None) == output_router_logits
    shifted = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    torch.testing.assert_close(model(ids, shift_labels=shifted).loss, out.loss)


RECORDABLE = ("hidden_states", "attentions", "router_logits")


def recorded_by_hand(model: GPTMoEForCausalLM, ids: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """What every block, attention and router computes on ids, caught by forward hooks of our own, and the logits."""
    seen = {name: [] for name in RECORDABLE}
    modules = [(block, "hidden_states") for block in model.transformer.h]
    modules += [(block.attn, "attentions") for block in model.transformer.h]
    modules += [(module, "router_logits") for module in model.modules() if isinstance(module, GPTMoERouter)]
    handles = [
        module.register_forward_hook(lambda _, args, output, name=name: seen[name].append((args[0], output)))
        for module, name in modules
    ]
    with torch.no_grad():
        logits = model(ids).logits
    for handle in handles:
        handle.remove()
    return seen, logits


@pytest.mark.parametrize("asked_in", ["call", "config"])
def test_hidden_states_attentions_and_router_logits_recorded_when_asked(asked_in):
    model = tiny_model(seed=12, n_layer=3, mlp_only_layers=[1])
    model.set_attn_implementation("eager")
    ids = random_ids(2, 7)
    seen, logits = recorded_by_hand(model, ids)
    with torch.no_grad():
        plain = model(ids)
        if asked_in == "config":
            for name in RECORDABLE:
                setattr(model.config, f"output_{name}", True)
            out = model(ids)
        else:
            out = model(ids, **{f"output_{name}": True for name in RECORDABLE})
    assert all(getattr(plain, name) is None for name in RECORDABLE)
    torch.testing.assert_close(out.logits, logits)
    # embeddings, then each block's output, the last one after ln_f
    blocks = seen["hidden_states"]
    assert len(out.hidden_states) == 4
    block_inputs = [block_input for block_input, _ in blocks]
    for recorded, expected in zip(out.hidden_states, block_inputs, strict=False):  # the last one below
        torch.testing.assert_close(recorded, expected)
    torch.testing.assert_close(out.hidden_states[-1], model.transformer.ln_f(blocks[-1][1]))
    assert len(out.attentions) == 3 and out.attentions[0].shape == (2, 4, 7, 7)
    for recorded, (_, (_, weights)) in zip(out.attentions, seen["attentions"], strict=True):
        torch.testing.assert_close(recorded, weights)
    assert torch.all(out.attentions[0].triu(diagonal=1) == 0)  # causal
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (14, 4)  # the two MoE layers
    for recorded, (_, (router_logits, _, _)) in zip(out.router_logits, seen["router_logits"], strict=True):
        torch.testing.assert_close(recorded, router_logits)
    if asked_in == "config":  # the call overrides the config
        with torch.no_grad():
            out = model(ids, **{f"output_{name}": False for name in RECORDABLE})
        assert all(getattr(out, name) is None for name in RECORDABLE)


def test_dense_model_has_no_router_logits_or_aux_loss():
    model = tiny_model(seed=12, use_moe=False)
    ids = random_ids(2, 5)
    out = model(ids, labels=ids, output_router_logits=True)
    assert out.router_logits is None and out.aux_loss is None and out.z_loss is None


def test_dense_layer_pattern():
    config = tiny_config(n_layer=6, mlp_only_layers=[0], decoder_sparse_step=2)
    assert [config.is_moe_layer(i) for i in range(6)] == [False, True, False, True, False, True]
    assert not any(tiny_config(use_moe=False).is_moe_layer(i) for i in range(2))


# ---------------------------------------------------------------- transformers conventions


def test_tuple_outputs():
    model = tiny_model(seed=13)
    ids = random_ids(2, 7)
    with torch.no_grad():
        out = model(ids, labels=ids)
        loss, aux_loss, logits, cache, z_loss = model(ids, labels=ids, return_dict=False)
    for got, expected in ((loss, out.loss), (aux_loss, out.aux_loss), (logits, out.logits), (z_loss, out.z_loss)):
        torch.testing.assert_close(got, expected)
    assert isinstance(cache, Cache) and cache.get_seq_length() == 7


def enable_activation_checkpointing(model: GPTMoEForCausalLM, use_reentrant: bool = False) -> None:
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # the name in 5.23 (not in 5.17)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # deprecated in 5.23, the only name in 5.17 (the GPU image)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def test_gradient_checkpointing_recomputes_blocks_and_gives_same_gradients():
    ids = random_ids(2, 12)
    grads, block_calls = [], []
    for checkpointing in (False, True):
        model = tiny_model(seed=14).train()
        if checkpointing:
            enable_activation_checkpointing(model)
        # a module inside the block: from 5.23 on, the block's own hooks stay outside the checkpoint
        ln_1_calls = []
        model.transformer.h[0].ln_1.register_forward_hook(lambda *_, calls=ln_1_calls: calls.append(1))
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        block_calls.append(len(ln_1_calls))
    assert block_calls == [1, 2]  # checkpointing is on: the block ran again in the backward
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_reentrant_checkpointing_is_refused_where_the_router_losses_would_not_train():
    # reentrant checkpointing runs the blocks without autograd: the router logits recorded there carry no gradient
    ids = random_ids(2, 12)
    model = tiny_model(seed=14).train()
    enable_activation_checkpointing(model, use_reentrant=True)
    with pytest.raises(ValueError, match="use_reentrant=False"):
        model(ids, labels=ids)
    model.transformer.requires_grad_(False)  # frozen routers (the embeddings keep the loss differentiable)
    model.transformer.wte.requires_grad_(True)
    model(ids, labels=ids).loss.backward()
    dense = tiny_model(seed=14, use_moe=False).train()
    enable_activation_checkpointing(dense, use_reentrant=True)
    dense(ids, labels=ids).loss.backward()


def test_checkpointed_training_leaves_a_given_cache_alone():
    ids = random_ids(2, 12)
    model = tiny_model(seed=14).train()
    expected = model(ids, labels=ids, use_cache=False).loss
    enable_activation_checkpointing(model)
    cache = DynamicCache(config=model.config)
    out = model(ids, labels=ids, **{GENERATE_CACHE_NAME: cache})
    out.loss.backward()
    assert cache.get_seq_length() == 0  # the backward's rerun of each block would have written it twice
    torch.testing.assert_close(out.loss, expected)


def test_resize_token_embeddings_keeps_weights_tied():
    model = tiny_model(seed=15)
    model.resize_token_embeddings(128)
    assert model.lm_head.weight.shape == (128, 32)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert model(random_ids(1, 4, vocab=128)).logits.shape == (1, 4, 128)


@pytest.mark.parametrize(
    "overrides, sharded, expert_parallel",
    [
        (dict(use_moe=False), {"mlp.c_fc"}, False),
        (dict(), set(), True),
        (dict(n_shared_experts=1), {"shared_experts"}, True),
        (dict(n_shared_experts=1, mlp_only_layers=[0]), {"mlp.c_fc", "shared_experts"}, True),
    ],
)
def test_parallel_plans_name_only_modules_the_config_builds(tmp_path, overrides, sharded, expert_parallel):
    # tests/test_parallel.py runs them; the routed experts are sharded by the expert-parallel plan only
    model = tiny_model(seed=16, **overrides)
    names = {name for name, _ in model.transformer.named_parameters()} | {
        name for name, _ in model.transformer.named_modules()
    }
    tp_plan, ep_plan = model.config.base_model_tp_plan, model.config.base_model_ep_plan
    for pattern in [*tp_plan, *ep_plan]:
        regex = pattern.replace(".", r"\.").replace("*", r"\d+")
        assert any(re.fullmatch(regex, name) for name in names), pattern
    parts = ("mlp.c_fc", "mlp.experts", "shared_experts")
    assert {part for part in parts if any(part in pattern for pattern in tp_plan)} == sharded
    assert bool(ep_plan) == expert_parallel
    assert all("experts" in pattern or "router" in pattern for pattern in ep_plan)
    model.save_pretrained(tmp_path)
    loaded = GPTMoEForCausalLM.from_pretrained(tmp_path).config
    assert (loaded.base_model_tp_plan, loaded.base_model_ep_plan) == (tp_plan, ep_plan)
    assert "GPTMoEBlock" in model._no_split_modules


def test_from_pretrained_keeps_every_loaded_weight(tmp_path):
    model = tiny_model(seed=17, n_shared_experts=1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.5)  # far from any initialisation
    model.save_pretrained(tmp_path)
    loaded = GPTMoEForCausalLM.from_pretrained(tmp_path)
    expected = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


# ---------------------------------------------------------------- initialisation and config


def test_init_follows_gpt2():
    torch.manual_seed(0)
    config = GPTMoEConfig(vocab_size=2000, block_size=128, n_layer=4, n_head=4, n_embd=128, num_experts=4)
    model = GPTMoEForCausalLM(config)
    residual_std = 0.02 / math.sqrt(2 * 4)
    block = model.transformer.h[1]
    stds = {
        "wte": (model.transformer.wte.weight, 0.02),
        "wpe": (model.transformer.wpe.weight, 0.02),
        "c_attn": (block.attn.c_attn.weight, 0.02),
        "attn.c_proj": (block.attn.c_proj.weight, residual_std),
        "router": (block.mlp.router.weight, 0.02),
        "up_proj": (block.mlp.experts.up_proj, 0.02),
        "down_proj": (block.mlp.experts.down_proj, residual_std),
    }
    for name, (weight, expected) in stds.items():
        assert weight.std().item() == pytest.approx(expected, rel=0.05), name
    for name, param in model.named_parameters():
        if name.endswith("bias") and "ln_" not in name:
            assert torch.all(param == 0), name
    assert torch.all(block.ln_1.weight == 1)
    dense = GPTMoEForCausalLM(
        GPTMoEConfig(vocab_size=2000, block_size=128, n_layer=4, n_head=4, n_embd=128, use_moe=False)
    )
    assert dense.transformer.h[0].mlp.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)


def test_seed_and_hf_names_are_aliases():
    config = GPTMoEConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, num_local_experts=6)
    assert (config.n_embd, config.n_layer, config.n_head, config.num_experts) == (64, 3, 2, 6)
    config = GPTMoEConfig(block_size=256, n_embd=48, n_head=3, vocab_size=50304, use_moe=False)
    assert (config.max_position_embeddings, config.hidden_size, config.num_attention_heads) == (256, 48, 3)
    assert config.moe_intermediate_size == config.intermediate_size == 192


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n_embd=100, n_head=3), "n_embd"),
        (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(num_experts=0), "num_experts"),
        (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef"),
        (dict(router_z_loss_coef=-1.0), "router_z_loss_coef"),
        (dict(router_aux_loss_scope="global"), "router_aux_loss_scope"),
        (dict(router_bias_update_rate=-1e-3), "router_bias_update_rate"),
        (dict(activation_function="swishy"), "activation_function"),
        (dict(mlp_only_layers=[12]), "mlp_only_layers"),
    ],
)
def test_invalid_config_raises_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GPTMoEConfig(**kwargs)
