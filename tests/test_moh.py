"""Mixture-of-Heads: what its users rely on — `all` is ordinary attention, standard MoH routes the way
the paper says, every adaptive predictor learns from the language-model loss (and `none` reproduces the
version where none does), skipped heads give the same output as computed ones, and generation works."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from decollapse.configuration.moh import MoHConfig
from decollapse.modeling.moh import MoHAttention, MoHForCausalLM, MoHRouter, routing_losses

from .conftest import tiny_config, tiny_model

ADAPTIVE_GRADS = ["soft", "gumbel", "ste"]
ROUTINGS = [("topk", "ste"), ("topp", "ste")] + [("adaptive", g) for g in ADAPTIVE_GRADS + ["none"]]


def _batch(seed=0, batch=3, length=12, vocab=61, left_pad=4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :left_pad] = 0
    return ids, mask


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"routing": "soft"}, "routing"),
        ({"routing_grad": "straight"}, "routing_grad"),
        ({"num_attention_heads": 8, "num_key_value_heads": 3}, "num_attention_heads"),
        ({"routing": "topk", "num_shared_heads": 2, "routing_top_k": 7}, "routing_top_k"),
        ({"routing": "topk", "num_shared_heads": 8}, "num_shared_heads"),
        ({"routing": "topp", "routing_top_p": 0.0}, "routing_top_p"),
        ({"threshold_min": 0.5, "threshold_max": 0.4}, "threshold_max"),
        ({"use_complexity_head": False, "use_threshold_head": False}, "use_threshold_head"),
        ({"routing_grad": "soft", "skip_inactive_heads": "always"}, "skip_inactive_heads"),
        ({"budget_weight": -1.0}, "budget_weight"),
    ],
)
def test_config_names_the_bad_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        MoHConfig(**overrides)


def test_routing_knobs_do_not_collide_with_generation_parameters(tmp_path):
    # transformers treats config fields named top_k / top_p as sampling settings; ours must survive a
    # save / load and never reach generate().
    config = MoHConfig(routing="topk", routing_top_k=3, routing_top_p=0.7)
    config.save_pretrained(tmp_path)
    loaded = MoHConfig.from_pretrained(tmp_path)
    assert (loaded.routing_top_k, loaded.routing_top_p) == (3, 0.7)
    assert GenerationConfig.from_model_config(loaded).top_k != 3, "a routing knob became a sampling setting"


# -- routing="all" is ordinary attention -----------------------------------------------------------


def _reference_gqa(attn: MoHAttention, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Multi-head / grouped-query attention written out: softmax(QKᵀ/√d + mask) V, then W_o."""
    b, t, _ = x.shape
    h, kv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(b, t, h, d).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, kv, d).transpose(1, 2).repeat_interleave(h // kv, dim=1)
    v = attn.v_proj(x).view(b, t, kv, d).transpose(1, 2).repeat_interleave(h // kv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(~allowed, float("-inf"))
    heads = scores.softmax(-1) @ v
    return attn.o_proj(heads.transpose(1, 2).reshape(b, t, h * d))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_all_heads_is_multi_head_or_grouped_query_attention(kv_heads):
    torch.manual_seed(0)
    config = tiny_config("moh", routing="all", num_attention_heads=4, num_key_value_heads=kv_heads)
    attn = MoHAttention(config, 0).eval()
    x = torch.randn(2, 10, config.hidden_size)
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    out, heads, routing = attn(x, None, True)
    assert routing is None and heads.shape == (2, 10, 4, config.head_dim)
    torch.testing.assert_close(out, _reference_gqa(attn, x, causal), atol=1e-6, rtol=1e-5)
    # and with a padding mask in SDPA's boolean form
    allowed = causal.expand(2, 1, 10, 10).clone()
    allowed[0, :, :, :3] = False
    allowed |= torch.eye(10, dtype=torch.bool)
    out, _, _ = attn(x, allowed, False)
    torch.testing.assert_close(out, _reference_gqa(attn, x, allowed), atol=1e-6, rtol=1e-5)


def test_routing_that_keeps_every_head_at_weight_one_is_all_heads():
    torch.manual_seed(0)
    config = tiny_config("moh", routing="adaptive", routing_grad="none", use_complexity_head=False,
                         threshold_min=0.99, threshold_max=0.999)  # τ > any mass before the last head
    attn = MoHAttention(config, 0).eval()
    x = torch.randn(2, 9, config.hidden_size)
    out, _, routing = attn(x, None, True)
    assert bool(routing.active.all()) and bool((routing.weights == 1).all())
    reference = MoHAttention(tiny_config("moh", routing="all"), 0)
    reference.load_state_dict(attn.state_dict(), strict=False)
    torch.testing.assert_close(out, reference(x, None, True)[0], atol=0, rtol=0)


# -- standard MoH ----------------------------------------------------------------------------------


def test_topk_keeps_the_shared_heads_and_exactly_k_routed_heads_weighted_by_alpha():
    torch.manual_seed(0)
    config = tiny_config("moh", routing="topk", num_attention_heads=6, num_key_value_heads=2,
                         num_shared_heads=2, routing_top_k=2)
    router = MoHRouter(config)
    torch.nn.init.normal_(router.routed.weight, std=1.0)
    x = torch.randn(2, 7, config.hidden_size)
    r = router(x)
    assert bool(r.active[..., :2].all()), "shared heads are always on"
    assert bool((r.active[..., 2:].sum(-1) == 2).all())
    top2 = r.probs.topk(2, dim=-1).indices
    assert bool(torch.zeros_like(r.selected).scatter(-1, top2, True).eq(r.selected).all())
    # shared weights sum to H·α₁; routed weights are H·α₂·P on the selected heads, 0 elsewhere
    torch.testing.assert_close(r.weights[..., :2].sum(-1), 6 * r.alpha[..., 0])
    torch.testing.assert_close(r.weights[..., 2:], 6 * r.alpha[..., 1:] * r.probs * r.selected)


def test_topp_keeps_the_smallest_set_reaching_the_mass():
    torch.manual_seed(0)
    config = tiny_config("moh", routing="topp", num_attention_heads=6, num_key_value_heads=2,
                         num_shared_heads=1, routing_top_p=0.6)
    router = MoHRouter(config)
    torch.nn.init.normal_(router.routed.weight, std=1.0)
    r = router(torch.randn(4, 9, config.hidden_size))
    kept = (r.probs * r.selected).sum(-1)
    assert bool((kept >= 0.6 - 1e-6).all())
    # dropping the weakest kept head would fall below the mass
    weakest = r.probs.masked_fill(~r.selected, 2.0).min(-1).values
    assert bool((kept - weakest < 0.6).all())


@pytest.mark.parametrize("routing", ["topk", "topp"])
def test_every_standard_router_parameter_gets_the_language_model_gradient(routing):
    model = tiny_model("moh", routing=routing, load_balance_weight=0.0)
    ids, mask = _batch()
    model(input_ids=ids, attention_mask=mask, labels=ids).task_loss.backward()
    for i, layer in enumerate(model.model.layers):
        for name in ("shared", "routed", "mix"):
            grad = getattr(layer.attn.router, name).weight.grad
            assert grad is not None and float(grad.abs().sum()) > 0, f"layer {i} {name}"


# -- adaptive MoH ----------------------------------------------------------------------------------


def _set_logits(router: MoHRouter, probs: list[float]) -> torch.Tensor:
    """A router whose logits for the input e_0 are log(probs); returns that input."""
    with torch.no_grad():
        router.scores.weight.zero_()
        router.scores.weight[:, 0] = torch.tensor(probs).log()
    x = torch.zeros(1, 1, router.scores.in_features)
    x[..., 0] = 1.0
    return x


def test_adaptive_keeps_heads_in_descending_probability_while_the_mass_before_is_below_the_threshold():
    config = tiny_config("moh", routing="adaptive", routing_grad="soft", num_attention_heads=4,
                         num_key_value_heads=2, use_complexity_head=False, use_temperature_head=False,
                         threshold_min=0.1, threshold_max=0.9)
    router = MoHRouter(config).eval()
    x = _set_logits(router, [0.15, 0.5, 0.05, 0.3])
    with torch.no_grad():
        router.threshold.weight.zero_()
        router.threshold.bias.fill_(math.log(0.75 / 0.25))  # τ = 0.1 + 0.8·0.75 = 0.7
    r = router(x)
    # mass before each head in descending order: head1 0, head3 0.5, head0 0.8, head2 0.95
    assert r.active[0, 0].tolist() == [False, True, False, True]
    gates = r.soft_gates[0, 0]
    assert gates[1] > gates[3] > 0.5 > gates[0] > gates[2], "stronger heads get larger gates"
    # inference weights: the kept heads keep P·g·H, the dropped ones are exactly 0
    torch.testing.assert_close(r.weights[0, 0], 4 * r.probs[0, 0] * gates * r.active[0, 0])


def test_the_complexity_head_caps_the_count():
    config = tiny_config("moh", routing="adaptive", routing_grad="ste", num_attention_heads=4,
                         num_key_value_heads=2, use_threshold_head=False, use_temperature_head=False,
                         min_active_heads=1, max_active_heads=4)
    router = MoHRouter(config).eval()
    x = _set_logits(router, [0.4, 0.3, 0.2, 0.1])
    with torch.no_grad():
        router.complexity.weight.zero_()
        router.complexity.bias.fill_(0.0)  # n = 1 + 3·½ = 2.5: ranks 0 and 1
    assert router(x).active[0, 0].tolist() == [True, True, False, False]


@pytest.mark.parametrize("grad", ADAPTIVE_GRADS)
def test_every_adaptive_predictor_gets_a_language_model_gradient(grad):
    model = tiny_model("moh", routing="adaptive", routing_grad=grad, load_balance_weight=0.0, budget_weight=0.0)
    model.train()
    ids, mask = _batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.aux_losses == {}, "the gradient below is the language model's alone"
    out.task_loss.backward()
    for i, layer in enumerate(model.model.layers):
        router = layer.attn.router
        for name in ("scores", "complexity", "threshold", "temperature"):
            grad_w = getattr(router, name).weight.grad
            assert grad_w is not None and float(grad_w.norm()) > 0, f"layer {i}: {name} gets no LM gradient"


def test_none_blocks_every_routing_gradient_as_the_seed_diagnosed():
    model = tiny_model("moh", routing="adaptive", routing_grad="none", load_balance_weight=0.0, budget_weight=0.0)
    ids, mask = _batch()
    model(input_ids=ids, attention_mask=mask, labels=ids).task_loss.backward()
    for layer in model.model.layers:
        for p in layer.attn.router.parameters():
            assert p.grad is None
        assert float(layer.attn.q_proj.weight.grad.norm()) > 0, "the heads still learn"
    assert MoHConfig().routing_grad != "none"


def test_head_budget_is_the_distance_of_the_expected_share_from_the_target():
    model = tiny_model("moh", routing="adaptive", routing_grad="soft", target_head_share=0.25, budget_weight=1.0)
    ids, mask = _batch()
    captured = []
    hook = model.model.layers[0].attn.register_forward_hook(lambda m, a, out: captured.append(out[2]))
    terms = model(input_ids=ids, attention_mask=mask, labels=ids).aux_losses
    hook.remove()
    gates = captured[0].gates[mask.bool()]
    layer0 = abs(float(gates.detach().sum(-1).mean()) / 4 - 0.25)
    single = routing_losses(captured, mask.bool(), model.config)["head_budget"]
    assert float(single.detach()) == pytest.approx(layer0, rel=1e-5)
    assert float(terms["head_budget"].detach()) > 0


def test_predictors_start_at_the_target_share():
    config = MoHConfig(hidden_size=64, target_head_share=0.5)
    model = MoHForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (4, 64))
    report = model.collapse_report({"input_ids": ids})
    for i in range(config.num_hidden_layers):
        assert report.metrics[f"layer{i}.routing.active_share"] == pytest.approx(0.5, abs=0.1)


def test_gumbel_temperature_anneals_over_training_forwards_only():
    model = tiny_model("moh", routing="adaptive", routing_grad="gumbel", gumbel_temperature_start=1.0,
                       gumbel_temperature_end=0.1, gumbel_anneal_steps=4)
    router = model.model.layers[0].attn.router
    ids, mask = _batch()
    assert router.gumbel_temperature() == pytest.approx(1.0)
    model.train()
    for _ in range(2):
        model(input_ids=ids, attention_mask=mask, labels=ids)
    assert router.gumbel_temperature() == pytest.approx(0.1**0.5)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    model.collapse_report({"input_ids": ids, "attention_mask": mask})
    assert int(router.steps) == 2, "evaluation and the collapse report leave the schedule alone"
    model.train()
    for _ in range(5):
        model(input_ids=ids, attention_mask=mask, labels=ids)
    assert router.gumbel_temperature() == pytest.approx(0.1)


# -- compute saving: skipped heads give what computing them would ------------------------------------


@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
@pytest.mark.parametrize("routing,grad", ROUTINGS)
def test_skipping_inactive_heads_matches_computing_them(routing, grad, kernel):
    model = tiny_model("moh", routing=routing, routing_grad=grad, skip_kernel=kernel).eval()
    with torch.no_grad():  # a sharper router, so tokens differ in which heads they use
        for layer in model.model.layers:
            for module in layer.attn.router.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.normal_(std=0.5)
    ids, mask = _batch(length=14)
    with torch.no_grad():
        sparse = model(input_ids=ids, attention_mask=mask).logits
        for layer in model.model.layers:
            layer.attn.skip_inactive = "never"
        dense = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(sparse[real], dense[real], atol=1e-5, rtol=1e-5)


def test_the_sparse_path_attends_only_active_pairs(monkeypatch):
    torch.manual_seed(0)
    config = tiny_config("moh", routing="adaptive", routing_grad="ste")
    attn = MoHAttention(config, 0).eval()
    x = torch.randn(2, 16, config.hidden_size)
    query_rows = []
    sdpa = F.scaled_dot_product_attention

    def counting(query, *args, **kwargs):
        query_rows.append(query.shape[0] * query.shape[2])  # (B, 1, slots, d)
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        _, heads, routing = attn(x, None, True)
    assert heads is None, "the per-head outputs of every head were not computed"
    counts = routing.active.sum(1)  # (B, H)
    assert sum(query_rows) == int(counts.amax(0).sum()) * 2, "each head attends its own packed slots"
    assert sum(query_rows) < 2 * 16 * 4


def test_the_flex_kernel_keeps_packed_documents_and_the_cache_offset():
    """The flex path reads the same mask as the dense one: packed documents stay apart, and a cached
    continuation sees its whole prefix."""
    model = tiny_model("moh", routing="adaptive", skip_kernel="flex").eval()
    reference = tiny_model("moh", routing="adaptive").eval()
    ids, _ = _batch(length=14)
    positions = torch.cat([torch.arange(5), torch.arange(9)]).unsqueeze(0).expand(ids.shape[0], -1)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, position_ids=positions).logits,
                                   reference(input_ids=ids, position_ids=positions).logits, atol=1e-5, rtol=1e-5)
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=True)
        assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))


@pytest.mark.parametrize("kernel", [
    "sdpa",
    pytest.param("flex", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="flex_attention has no backward on a CPU")),
])
def test_skip_always_trains_topk_through_the_sparse_path(kernel):
    model = tiny_model("moh", routing="topk", skip_inactive_heads="always", load_balance_weight=0.0,
                       skip_kernel=kernel)
    ids, mask = _batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.task_loss.backward()
    reference = tiny_model("moh", routing="topk", load_balance_weight=0.0)
    ref = reference(input_ids=ids, attention_mask=mask, labels=ids)
    ref.task_loss.backward()
    torch.testing.assert_close(out.task_loss, ref.task_loss, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


# -- generation and the collapse report --------------------------------------------------------------


@pytest.mark.parametrize("routing", ["all", "topk", "adaptive"])
def test_generate_with_the_cache_matches_recomputing_the_prefix(routing):
    model = tiny_model("moh", routing=routing).eval()
    ids, mask = _batch(length=6, left_pad=2)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (3, 14)
    assert torch.equal(cached, uncached)


def test_collapse_report_measures_routing_and_gradients_without_side_effects():
    model = tiny_model("moh", routing="adaptive", routing_grad="soft")
    ids, mask = _batch()
    marker = torch.full_like(model.lm_head.weight, 7.0)
    model.lm_head.weight.grad = marker.clone()
    report = model.collapse_report({"input_ids": ids, "attention_mask": mask})
    assert torch.equal(model.lm_head.weight.grad, marker), "existing gradients are restored"
    m = report.metrics
    for i in range(2):
        share = m[f"layer{i}.routing.active_share"]
        assert m[f"layer{i}.routing.active_heads_mean"] == pytest.approx(4 * share)
        assert 1 <= m[f"layer{i}.routing.active_heads_min"] <= m[f"layer{i}.routing.active_heads_max"] <= 4
        assert 0.0 <= m[f"layer{i}.heads.gini"] <= 1.0
        for name in ("router", "threshold", "complexity", "temperature", "heads"):
            assert m[f"layer{i}.grad_norm.{name}"] > 0
        assert m[f"layer{i}.routing.threshold_min"] <= m[f"layer{i}.routing.threshold_mean"] <= m[f"layer{i}.routing.threshold_max"]
        assert "layer0.routing.threshold" in report.distributions and "layer1.routing.active_heads" in report.distributions
    none = tiny_model("moh", routing="adaptive", routing_grad="none").collapse_report({"input_ids": ids, "attention_mask": mask})
    assert none.metrics["layer0.grad_norm.predictors"] == 0.0 and none.metrics["layer0.grad_norm.router"] == 0.0
    assert none.metrics["layer0.grad_norm.heads"] > 0


def test_routing_statistics_ignore_padding():
    model = tiny_model("moh", routing="adaptive", routing_grad="ste")
    ids, mask = _batch(left_pad=6)
    other = ids.clone()
    other[0, :6] = torch.arange(40, 46)  # different pad content: the real tokens' routing cannot move
    a = model.collapse_report({"input_ids": ids, "attention_mask": mask}).metrics
    b = model.collapse_report({"input_ids": other, "attention_mask": mask}).metrics
    for key in ("layer0.routing.active_heads_mean", "layer1.routing.threshold_mean", "layer0.routing.load_balance",
                "layer1.heads.gini"):
        assert a[key] == pytest.approx(b[key], abs=1e-6), key
