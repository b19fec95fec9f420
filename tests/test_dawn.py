"""DAWN: what its users rely on — the DAWN v5.0 design built causal, the initialisations and
losses doing what they claim, and the analysis measuring what it names."""

import pytest
import torch

from decollapse.configuration.dawn import DawnConfig
from decollapse.modeling.dawn import DawnForCausalLM, DawnForMaskedLM, DawnModel, _coefficient_init
from decollapse.modeling.regularizers import mean_squared_off_diagonal_cosine, welch_floor

from .conftest import tiny_config, tiny_model

NO_AUX = {"orthogonality_weight": 0.0, "diversity_weight": 0.0, "sparsity_weight": 0.0, "balance_weight": 0.0}


# -- configuration -------------------------------------------------------------------------------


def test_config_refuses_sequence_composition_for_a_causal_lm():
    with pytest.raises(ValueError, match="ffn_composition='sequence'.*future"):
        DawnConfig(objective="causal_lm", ffn_composition="sequence")
    assert DawnConfig(objective="masked_lm", ffn_composition="sequence").ffn_composition == "sequence"


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"neuron_top_k": 200, "num_neurons": 128}, "neuron_top_k"),
        ({"neuron_init": "orthogonal"}, "neuron_init"),
        ({"ffn_composition": "prefix"}, "ffn_composition"),
        ({"min_bases_per_neuron": 40.0}, "min_bases_per_neuron"),
        ({"diversity_weight": -1.0}, "diversity_weight"),
        ({"num_neurons": 8, "num_basis": 16}, "neuron_init"),
        ({"router_temperature": 0.0}, "router_temperature"),
    ],
)
def test_config_names_the_bad_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        DawnConfig(**overrides)


def test_every_knob_of_the_original_is_configurable():
    knobs = DawnConfig.knobs()
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_neurons", "neuron_rank",
                 "neuron_top_k", "num_basis", "basis_rank", "modulation_rank", "intermediate_size",
                 "max_position_embeddings", "hidden_dropout", "ffn_composition", "neuron_init",
                 "basis_init_std", "orthogonality_weight", "diversity_weight", "sparsity_weight",
                 "context_residual", "balance_weight", "router_temperature", "mixing_norm"):
        assert name in knobs, name


# -- initialisation ------------------------------------------------------------------------------


def test_qr_init_gives_orthonormal_columns_not_orthonormal_rows():
    torch.manual_seed(0)
    q = _coefficient_init("qr", 512, 16)
    torch.testing.assert_close(q.T @ q, torch.eye(16), atol=1e-5, rtol=0)
    row_norms = q.norm(dim=1)
    assert abs(float(row_norms.mean()) - (16 / 512) ** 0.5) < 0.02, "rows have norm ~sqrt(M/N), not 1"
    # A tight frame sits exactly on the Welch floor, and that floor is far from 0 (the seed's "< 0.01"
    # target is unreachable).
    msodc = float(mean_squared_off_diagonal_cosine(q))
    assert abs(msodc - welch_floor(512, 16)) < 2e-3
    assert msodc > 0.05


def test_uniform_init_reproduces_the_collapsed_start_and_normal_does_not():
    torch.manual_seed(0)
    uniform = DawnForCausalLM(tiny_config("dawn", neuron_init="uniform")).collapse_report(
        {"input_ids": torch.randint(3, 61, (2, 16))}
    )
    torch.manual_seed(0)
    normal = DawnForCausalLM(tiny_config("dawn", neuron_init="normal")).collapse_report(
        {"input_ids": torch.randint(3, 61, (2, 16))}
    )
    assert uniform.metrics["layer0.coef_A.similar_pair_fraction"] > 0.99
    assert normal.metrics["layer0.coef_A.similar_pair_fraction"] < 0.1
    q = DawnForCausalLM(tiny_config("dawn", neuron_init="normal")).model.layers[0].ffn.coef_A
    assert not torch.allclose(q.T @ q, torch.eye(q.shape[1]), atol=1e-2)


def test_loading_a_checkpoint_keeps_its_coefficients(tmp_path):
    model = tiny_model("dawn")
    with torch.no_grad():
        model.model.layers[0].ffn.coef_A.add_(1.0)
    model.save_pretrained(tmp_path)
    loaded = DawnForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.model.layers[0].ffn.coef_A, model.model.layers[0].ffn.coef_A)


# -- forward: the design, computed the fast way, equals the definition -----------------------------


def test_router_writes_the_weighted_sum_of_its_top_k_neurons():
    model = tiny_model("dawn").eval()
    router = model.model.layers[0].router
    u = torch.randn(2, 5, 32)
    routing = router(u, None, True)
    neurons = router.neurons()
    expected = (routing.weights.unsqueeze(-1) * neurons[routing.indices]).sum(-2)
    torch.testing.assert_close(routing.written, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(2, 5))
    assert routing.indices.shape == (2, 5, model.config.neuron_top_k)


def test_router_temperature_sharpens_the_weights_of_the_same_selection():
    torch.manual_seed(0)
    v50 = DawnForCausalLM(DawnConfig(vocab_size=100)).eval()
    cooler = DawnForCausalLM(DawnConfig(vocab_size=100, router_temperature=0.25)).eval()
    cooler.load_state_dict(v50.state_dict())  # the temperature has no parameter: same weights
    u = torch.randn(2, 16, 64)
    raw = v50.model.layers[0].router(u, None, True)
    tempered = cooler.model.layers[0].router(u, None, True)
    assert v50.config.router_temperature == 1.0, "the default is v5.0's softmax over the raw scores"
    assert torch.equal(tempered.indices, raw.indices), "dividing every score by T keeps their order"
    torch.testing.assert_close(tempered.scores, raw.scores / 0.25)
    torch.testing.assert_close(tempered.weights, (raw.scores.gather(-1, raw.indices) / 0.25).softmax(-1))
    assert tempered.weights.max(-1).values.mean() > raw.weights.max(-1).values.mean()


def test_mixing_norm_keeps_each_mixing_vector_direction_at_unit_norm():
    normed = tiny_model("dawn").eval()
    v50 = tiny_model("dawn", mixing_norm=False).eval()  # same seed: the same weights
    assert normed.config.mixing_norm is True, "unit-norm mixing is the default"
    u = torch.randn(2, 6, v50.config.hidden_size)
    routing = v50.model.layers[0].router(u, None, True)
    raw_a, raw_b = v50.model.layers[0].ffn.compose(routing.dense_weights, None)
    unit_a, unit_b = normed.model.layers[0].ffn.compose(routing.dense_weights, None)
    for raw, unit in ((raw_a, unit_a), (raw_b, unit_b)):
        torch.testing.assert_close(unit.norm(dim=-1), torch.ones(2, 6))
        torch.testing.assert_close(unit, raw / raw.norm(dim=-1, keepdim=True))
    assert not torch.allclose(raw_a.norm(dim=-1), torch.ones(2, 6)), "v5.0's mixing is not unit-norm"


def test_a_checkpoint_saved_before_mixing_norm_existed_loads_with_v50_mixing(tmp_path):
    """Checkpoints from before the option have no ``mixing_norm`` key; they were trained with raw
    mixing and must load as that model, through every loading path, while new configs normalise."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    model = tiny_model("dawn", mixing_norm=False)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["mixing_norm"] is False, "a config saved now records the value it was trained with"
    del saved["mixing_norm"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert AutoConfig.from_pretrained(tmp_path).mixing_norm is False
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.mixing_norm is False
    ids = torch.randint(3, 61, (2, 8))
    torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    assert DawnConfig.from_dict({**saved, "mixing_norm": True}).mixing_norm is True, "a saved key wins"
    assert DawnConfig().mixing_norm is True and tiny_config("dawn").mixing_norm is True
    tiny_model("dawn").save_pretrained(tmp_path / "today")  # the default is saved, not left to the rule
    assert AutoConfig.from_pretrained(tmp_path / "today").mixing_norm is True


def test_mixing_norm_still_trains_the_coefficients_through_the_ffn():
    layer = tiny_model("dawn").model.layers[0]
    u = torch.randn(2, 6, layer.ffn.basis_A.size(1))
    routing = layer.router(u, None, True)
    layer.ffn(u, routing, None).square().sum().backward()  # the FFN's output alone, no auxiliary loss
    assert layer.ffn.coef_A.grad.abs().sum() > 0 and layer.ffn.coef_B.grad.abs().sum() > 0


@pytest.mark.parametrize("mixing_norm", [True, False])
def test_basis_ffn_equals_the_materialised_per_token_up_projection(mixing_norm):
    """out = down(GELU(v · (Σ a_m A_m)(Σ b_m B_m)) ⊙ σ(mod)) per token, with a, b from that token's own
    neurons (scaled to unit norm with ``mixing_norm``) — computed here the slow, literal way."""
    model = tiny_model("dawn", mixing_norm=mixing_norm).eval()
    layer = model.model.layers[0]
    ffn = layer.ffn
    v = torch.randn(2, 4, 32)
    routing = layer.router(torch.randn(2, 4, 32), None, True)
    fast = ffn(v, routing, None)
    for b in range(2):
        for t in range(4):
            w, idx = routing.weights[b, t], routing.indices[b, t]
            a = (w.unsqueeze(-1) * ffn.coef_A[idx]).sum(0)
            bb = (w.unsqueeze(-1) * ffn.coef_B[idx]).sum(0)
            if mixing_norm:
                a, bb = a / a.norm(), bb / bb.norm()
            up = torch.einsum("m,mdr->dr", a, ffn.basis_A) @ torch.einsum("m,mrf->rf", bb, ffn.basis_B)
            hidden = torch.nn.functional.gelu(v[b, t] @ up, approximate="tanh")
            mod = ffn.modulation_out(torch.relu(ffn.modulation_in(routing.written[b, t])))
            slow = ffn.down_proj(hidden * torch.sigmoid(mod))
            torch.testing.assert_close(fast[b, t], slow, rtol=1e-4, atol=1e-6)


def test_causal_prefix_cannot_see_the_future():
    """The default per-token composition is covered by the registry-wide causality contract."""
    model = tiny_model("dawn", ffn_composition="causal_prefix").eval()
    ids = torch.randint(3, 61, (2, 20))
    base = model(input_ids=ids).logits
    for t in (0, 9):
        changed = ids.clone()
        changed[:, t + 1 :] = torch.randint(3, 61, changed[:, t + 1 :].shape)
        torch.testing.assert_close(model(input_ids=changed).logits[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("composition", ["token", "causal_prefix"])
def test_left_padding_enters_no_pooling(composition):
    model = tiny_model("dawn", ffn_composition=composition).eval()
    ids = torch.randint(3, 61, (2, 10))
    base = model(input_ids=ids).logits
    for filler in (0, 9):
        padded = torch.cat([torch.full((2, 4), filler), ids], dim=1)
        mask = torch.cat([torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 10, dtype=torch.long)], dim=1)
        torch.testing.assert_close(model(input_ids=padded, attention_mask=mask).logits[:, 4:], base, rtol=0, atol=1e-5)


def test_causal_prefix_uses_the_mean_selection_so_far():
    model = tiny_model("dawn", ffn_composition="causal_prefix").eval()
    ffn = model.model.layers[0].ffn
    routing = model.model.layers[0].router(torch.randn(1, 6, 32), None, True)
    mix_a, _ = ffn.compose(routing.dense_weights, None)
    per_token = routing.dense_weights @ ffn.coef_A
    so_far = per_token[0, :4].mean(0)
    torch.testing.assert_close(mix_a[0, 3], so_far / so_far.norm())  # then scaled to unit norm (mixing_norm)


@pytest.mark.parametrize("composition", ["token", "causal_prefix", "sequence"])
def test_masked_lm_right_padding_enters_no_pooling(composition):
    model = tiny_model("dawn", objective="masked_lm", ffn_composition=composition).eval()
    ids = torch.randint(3, 61, (2, 10))
    base = model(input_ids=ids).logits
    padded = torch.cat([ids, torch.full((2, 5), 7)], dim=1)
    mask = torch.cat([torch.ones(2, 10, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(input_ids=padded, attention_mask=mask).logits[:, :10], base, rtol=0, atol=1e-5)


def test_masked_lm_router_context_is_bidirectional():
    """The original trained MLM under a causal router mask; here a later token moves earlier positions."""
    model = tiny_model("dawn", objective="masked_lm").eval()
    ids = torch.randint(3, 61, (1, 12))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 61
    assert not torch.allclose(model(input_ids=ids).logits[0, 0], model(input_ids=changed).logits[0, 0])


def test_generate_re_encodes_the_prefix():
    model = tiny_model("dawn").eval()
    prompt = torch.randint(3, 61, (2, 5))
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ids = prompt
    for _ in range(6):
        ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids)


# -- losses ------------------------------------------------------------------------------------------


def test_losses_are_reported_minus_their_floor():
    model = tiny_model("dawn", orthogonality_weight=1.0, diversity_weight=1.0, sparsity_weight=1.0)
    config = model.config
    out = model(input_ids=torch.randint(3, 61, (1, 8)))
    layers = model.model.layers
    raw_ortho = sum(float(mean_squared_off_diagonal_cosine(layer.router.neuron_factors.detach())) for layer in layers) / 2
    expected = raw_ortho - welch_floor(config.num_neurons, config.neuron_rank)
    assert abs(out.aux_losses["router_orthogonality"].item() - expected) < 1e-6
    # QR coefficients are a tight frame whose rows have unequal norms: near the floor, not on it.
    assert 0.0 < out.aux_losses["coefficient_diversity"].item() < 0.01
    collapsed = tiny_model("dawn", diversity_weight=1.0, neuron_init="uniform")
    assert collapsed(input_ids=torch.randint(3, 61, (1, 8))).aux_losses["coefficient_diversity"].item() > 0.9


def test_basis_sparsity_has_a_gradient_that_spreads_concentrated_neurons():
    """The original's count of |coef| > 0.1 is a step function with zero gradient; this one moves a neuron
    that uses a single basis towards using more."""
    model = tiny_model("dawn", **{**NO_AUX, "sparsity_weight": 1.0})
    ffn = model.model.layers[0].ffn
    with torch.no_grad():
        # One dominant basis and faint others (an exactly one-hot row is a stationary point of any
        # function of the squared entries, this surrogate included).
        ffn.coef_A[0] = 0.01 * torch.randn(8)
        ffn.coef_A[0, 3] = 1.0
    loss = model(input_ids=torch.randint(3, 61, (1, 4))).aux_losses["basis_sparsity"]
    assert loss.item() > 0
    loss.backward()
    grad = ffn.coef_A.grad[0]
    assert grad.abs().sum() > 0
    with torch.no_grad():
        ffn.coef_A[0] -= 0.1 * grad
    assert model(input_ids=torch.randint(3, 61, (1, 4))).aux_losses["basis_sparsity"].item() < loss.item()


def test_task_loss_alone_reaches_router_coefficients_and_bases():
    """Routers that never got a gradient are a documented failure of the field: with every auxiliary
    weight at 0, the next-token loss still trains the neuron pool, the context attention, the gate, both
    coefficient matrices and both basis stacks of every layer."""
    model = tiny_model("dawn", **NO_AUX)
    ids = torch.randint(3, 61, (2, 16))
    out = model(input_ids=ids, labels=ids)
    assert out.aux_losses == {}
    out.loss.backward()
    for i, layer in enumerate(model.model.layers):
        for name in ("router.neuron_factors", "router.neuron_basis", "router.context.qkv_proj.weight",
                     "router.gate.weight", "ffn.coef_A", "ffn.coef_B", "ffn.basis_A", "ffn.basis_B",
                     "ffn.modulation_in.weight", "ffn.down_proj.weight", "router.context_proj.weight"):
            grad = layer.get_parameter(name).grad
            assert grad is not None and grad.abs().sum() > 0, f"layer {i}: no gradient reaches {name}"


def test_regularizers_reach_their_parameters():
    model = tiny_model("dawn", orthogonality_weight=1.0, diversity_weight=1.0, sparsity_weight=1.0,
                       neuron_init="normal")
    out = model(input_ids=torch.randint(3, 61, (1, 4)))
    (out.aux_losses["router_orthogonality"] + out.aux_losses["coefficient_diversity"]).backward()
    layer = model.model.layers[1]
    assert layer.router.neuron_factors.grad.abs().sum() > 0
    assert layer.ffn.coef_A.grad.abs().sum() > 0 and layer.ffn.coef_B.grad.abs().sum() > 0


def test_neuron_balance_reaches_the_router_and_ignores_padding():
    model = tiny_model("dawn", **{**NO_AUX, "balance_weight": 1.0})
    ids = torch.randint(3, 61, (2, 12))
    out = model(input_ids=ids)
    term = out.aux_losses["neuron_balance"]
    assert -1.0 < term.item() < model.config.num_neurons
    term.backward()
    router = model.model.layers[0].router
    assert router.neuron_factors.grad.abs().sum() > 0 and router.gate.weight.grad.abs().sum() > 0
    # Padding tokens take no part: the term of a left-padded batch equals the unpadded one.
    padded = torch.cat([torch.full((2, 3), 5), ids], dim=1)
    mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    with torch.no_grad():
        again = model(input_ids=padded, attention_mask=mask).aux_losses["neuron_balance"]
    torch.testing.assert_close(again, term.detach(), rtol=0, atol=1e-5)


# -- analysis ------------------------------------------------------------------------------------------


def test_usage_counts_real_tokens_only():
    """Left padding, whatever its token ids, changes no usage number: the pads' selections are not
    counted (the original measured usage with padding included)."""
    model = tiny_model("dawn")
    ids = torch.randint(3, 61, (2, 12))
    plain = model.collapse_report({"input_ids": ids})
    padded = model.collapse_report({
        "input_ids": torch.cat([torch.full((2, 5), 9), ids], dim=1),
        "attention_mask": torch.cat([torch.zeros(2, 5, dtype=torch.long), torch.ones_like(ids)], dim=1),
    })
    for i in range(2):
        torch.testing.assert_close(
            padded.distributions[f"layer{i}.neurons.usage_share"], plain.distributions[f"layer{i}.neurons.usage_share"]
        )
        for key in ("neurons.usage", "neurons.top10_share", "neurons.coactivation_strong_pairs", "basis.usage_gini"):
            assert padded.metrics[f"layer{i}.{key}"] == pytest.approx(plain.metrics[f"layer{i}.{key}"], abs=1e-6), key
    # The pads would have been counted: the same batch without its mask reports a different usage.
    unmasked = model.collapse_report({"input_ids": torch.cat([torch.full((2, 5), 9), ids], dim=1)})
    assert not torch.allclose(
        unmasked.distributions["layer0.neurons.usage_share"], plain.distributions["layer0.neurons.usage_share"]
    )


def test_report_metrics_are_in_range():
    model = tiny_model("dawn")
    ids = torch.randint(3, 61, (2, 12))
    m = model.collapse_report({"input_ids": ids, "domain": torch.randint(0, 3, (2, 12))}).metrics
    for i in range(2):
        for key in ("neurons.usage", "neurons.gini", "neurons.normalized_entropy", "neurons.top10_share",
                    "coef_A.similar_pair_fraction", "coef_B.effective_rank_entropy_ratio", "basis.usage_gini"):
            assert 0.0 <= m[f"layer{i}.{key}"] <= 1.0 + 1e-6, key
    assert 0.0 <= m["layers.0-1.usage_js_divergence"] <= 0.6932
    assert 0.0 <= m["layer0.neurons.normalized_mutual_information"] <= 1.0
    assert m["layer0.coef_A.effective_rank_entropy_ratio"] > 0.95, "QR coefficients have a flat spectrum"


def test_report_sees_a_collapsed_router():
    """Route every token to the same neurons (one dominant direction in the pool): the report must show
    low usage and high concentration, the seed's 'before' picture."""
    model = tiny_model("dawn", num_neurons=64, neuron_top_k=4)
    router = model.model.layers[0].router
    with torch.no_grad():
        # Every neuron a multiple of one direction: a token picks either the k largest or the k most
        # negative multiples, so only 2k of the 64 neurons are ever used.
        scale = torch.linspace(-1.0, 1.0, 64).unsqueeze(-1)
        router.neuron_factors.copy_(scale * router.neuron_factors[:1])
    ids = torch.randint(3, 61, (4, 16))
    m = model.collapse_report({"input_ids": ids}).metrics
    assert m["layer0.neurons.usage"] <= 8 / 64
    assert m["layer0.neurons.top10_share"] > 0.5
    assert m["layer1.neurons.usage"] > m["layer0.neurons.usage"]


def test_model_without_a_head_returns_hidden_states_and_terms():
    config = tiny_config("dawn")
    model = DawnModel(config)
    out = model(input_ids=torch.randint(3, 61, (1, 6)))
    assert out.last_hidden_state.shape == (1, 6, 32)
    assert set(out.aux_losses) == set(config.aux_loss_weight_fields)


def test_heads_refuse_the_other_objective():
    with pytest.raises(ValueError, match="objective"):
        DawnForCausalLM(DawnConfig(objective="masked_lm"))
    with pytest.raises(ValueError, match="objective"):
        DawnForMaskedLM(DawnConfig(objective="causal_lm"))
