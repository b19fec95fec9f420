"""SOSM: the block map, the causal graph, the four tiers' terms and what the collapse report measures.
Causality, padding invariance (in every graph and contextual setting: the registry's variants), save /
load, generation and export are the registry's contract tests."""

import pytest
import torch

from decollapse.cli import main
from decollapse.configuration.sosm import BLOCK_NAMES, block_shape
from decollapse.modeling.diagnostics import homonym_report, within_unit_cosine
from decollapse.modeling.regularizers import (
    block_mean_orthogonality,
    block_mean_orthogonality_floor,
    linear_cka_matrix,
    mean_off_diagonal_cka,
)
from decollapse.modeling.sosm import FIBONACCI, SosmBlockLayout, causal_graph, past_token_targets

from .conftest import tiny_config, tiny_model

ALL_TERMS = {
    "orthogonality_weight": 0.5, "decorrelation_weight": 0.5, "balance_weight": 0.5, "contrastive_weight": 0.5,
    "coherence_weight": 0.5, "aux_head_weight": 0.5, "reconstruction_weight": 0.5, "routing_balance_weight": 0.5,
}


def _columns(model, ids):
    g = torch.Generator().manual_seed(5)
    return {c: torch.randint(-1, 4, ids.shape, generator=g) for c in model.aux_label_columns}


# -- the block map --------------------------------------------------------------------------------------


def test_block_dim_4_is_the_8x8_matrix_of_2x2_blocks_of_the_design():
    layout = SosmBlockLayout(4)
    state = torch.arange(16).repeat_interleave(4).float()  # each feature carries its block's index
    matrix = layout.matrix(state)
    assert matrix.shape == (8, 8)
    flat = matrix.reshape(-1)
    # The design's table of flat row-major indices: I = 0, 1, 8, 9; R1 = 16, 17, 24, 25; X = 54, 55, 62, 63.
    for name, cells in (("I", (0, 1, 8, 9)), ("R1", (16, 17, 24, 25)), ("K", (22, 23, 30, 31)), ("X", (54, 55, 62, 63))):
        assert flat[list(cells)].tolist() == [BLOCK_NAMES.index(name)] * 4, name
    blocks = layout.blocks(state)
    assert blocks.shape == (16, 4) and torch.equal(blocks[:, 0], torch.arange(16.0))


@pytest.mark.parametrize("block_dim, shape", [(1, (1, 1)), (2, (1, 2)), (4, (2, 2)), (8, (2, 4)), (16, (4, 4)), (6, (2, 3))])
def test_the_layout_generalises_to_near_square_blocks(block_dim, shape):
    assert block_shape(block_dim) == shape
    layout = SosmBlockLayout(block_dim)
    state = torch.arange(16).repeat_interleave(block_dim).float()
    matrix = layout.matrix(state)
    rows, cols = shape
    assert matrix.shape == (4 * rows, 4 * cols)
    # Every block is one contiguous r x c sub-square at its grid cell.
    for b in range(16):
        r, c = divmod(b, 4)
        assert (matrix[r * rows:(r + 1) * rows, c * cols:(c + 1) * cols] == b).all()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"block_dim": 3}, "block_dim=3 is not allowed: expected a positive integer the 4 x 4 block layout can hold"),
        ({"block_dim": 7}, "block_dim=7"),
        ({"block_dim": 0}, "block_dim=0"),
        ({"block_routing": "capsules"}, "block_routing='capsules' is not allowed: expected one of 'none', 'moe', "
                                        "'separate', 'slots'"),
        ({"graph_blocks": ["I", "Q"]}, "graph_blocks=['I', 'Q'] is not allowed: expected a non-empty list of block names"),
        ({"aux_heads": {"domain": ["K", "Z9"]}}, "aux_heads['domain']"),
        ({"graph_shortcuts": -1}, "graph_shortcuts=-1 is not allowed: expected an integer >= 0"),
        ({"graph_semantic_k": -2}, "graph_semantic_k=-2"),
        ({"routing_top_k": 17}, "routing_top_k=17 is not allowed: expected an integer in [1, 16]"),
        ({"objective": "masked_lm", "graph_attention": True}, "graph_attention=True is not allowed"),
    ],
)
def test_bad_settings_name_the_field_and_what_is_allowed(overrides, message):
    with pytest.raises(ValueError, match=None) as err:
        tiny_config("sosm", **overrides)
    assert message in str(err.value)


def test_bad_settings_on_the_command_line_are_one_line_exit_2_and_write_nothing(tmp_path, capsys):
    for setting, message in (("block_dim=5", "block_dim=5"), ("block_routing=capsules", "block_routing='capsules'")):
        out = tmp_path / "out"
        capsys.readouterr()
        assert main(["train", "sosm", "--max-steps", "2", "--output-dir", str(out), "--set", setting]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_an_aux_label_column_the_dataset_lacks_is_named_with_the_columns_it_has(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["train", "sosm", "--max-steps", "2", "--output-dir", str(out), "--set",
            "corpus.num_train=32", "corpus.num_validation=8", "corpus.num_test=8", "corpus.seq_len=16",
            "aux_head_weight=0.1", 'aux_heads={"topic": ["K"], "domain": ["C2"]}']
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "'topic', which the dataset lacks (its columns: input_ids, domain, word_class, sense)" in err, err
    assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


# -- the causal graph -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_no_setting_can_put_a_forward_edge_in_the_graph(seed):
    """The graph only narrows causal attention: whatever k, threshold (even -1: keep everything) and
    shortcuts, every edge has j <= i, padding keys are dropped, and the self edge stays."""
    g = torch.Generator().manual_seed(seed)
    length = 20
    features = torch.randn(3, length, 6, generator=g)
    valid = torch.ones(3, length, dtype=torch.bool)
    valid[1, :4] = False  # a left-padded row
    for k, threshold, shortcuts in ((0, 0.0, 0), (3, -1.0, 2), (50, -1.0, len(FIBONACCI)), (5, 0.9, 4)):
        graph = causal_graph(features, valid, k, threshold, shortcuts)
        assert graph.shape == (3, length, length)
        assert not graph.triu(diagonal=1).any(), "a forward edge"
        assert graph.diagonal(dim1=1, dim2=2).all(), "a token always attends to itself"
        off_diagonal = graph & ~torch.eye(length, dtype=torch.bool)
        assert not off_diagonal[1][:, :4].any(), "an edge to padding"


def test_the_graph_is_built_per_sample_not_from_the_first_sample():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 12, 6, generator=g)
    valid = torch.ones(2, 12, dtype=torch.bool)
    both = causal_graph(features, valid, 3, -1.0, 2)
    for b in range(2):
        alone = causal_graph(features[b : b + 1], valid[b : b + 1], 3, -1.0, 2)
        assert torch.equal(both[b], alone[0])
    assert not torch.equal(both[0], both[1])


def test_semantic_edges_go_to_the_most_similar_earlier_tokens_beyond_the_previous_one():
    features = torch.tensor([[[1.0, -0.5], [0.0, 1.0], [1.0, 0.06], [0.0, 1.0], [1.0, 0.05]]])
    valid = torch.ones(1, 5, dtype=torch.bool)
    graph = causal_graph(features, valid, semantic_k=1, threshold=0.5, shortcuts=0)
    # Candidates are j < i - 1. Token 4 is most like token 2 (token 3, its predecessor, is linked anyway);
    # token 3 like token 1; token 2 can only reach token 0 (cos 0.87).
    expected = {4: {4, 3, 2}, 3: {3, 2, 1}, 2: {2, 1, 0}, 1: {1, 0}, 0: {0}}
    for i, keys in expected.items():
        assert set(graph[0, i].nonzero().squeeze(1).tolist()) == keys, i
    # below the threshold, no semantic edge
    strict = causal_graph(features, valid, semantic_k=1, threshold=0.99999, shortcuts=0)
    assert set(strict[0, 4].nonzero().squeeze(1).tolist()) == {4, 3}


def test_the_stack_attends_only_along_the_graph():
    """With sequential and shortcut edges only, the logits at i ignore a token the graph does not connect
    to i (one layer, so no path through another token)."""
    model = tiny_model("sosm", graph_attention=True, graph_semantic_k=0, graph_shortcuts=1, num_hidden_layers=1).eval()
    ids = torch.randint(3, model.config.vocab_size, (1, 10))
    i = 9  # attends to 9, 8 and 7 (distance 2)
    changed = ids.clone()
    changed[0, 4] = (ids[0, 4] + 1) % model.config.vocab_size
    torch.testing.assert_close(model(input_ids=changed).logits[0, i], model(input_ids=ids).logits[0, i])
    changed[0, 7] = (ids[0, 7] + 1) % model.config.vocab_size
    assert not torch.allclose(model(input_ids=changed).logits[0, i], model(input_ids=ids).logits[0, i])


def test_generation_recomputes_the_prefix_when_the_state_is_contextual():
    for overrides in ({"mu_layers": 1}, {"graph_attention": True}):
        model = tiny_model("sosm", **overrides).eval()
        assert model.config.use_cache is False
        prompt = torch.randint(3, model.config.vocab_size, (2, 5))
        out = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        logits = model(input_ids=out[:, :-1]).logits[:, -1]
        assert torch.equal(out[:, -1], logits.argmax(-1)), "greedy generation must equal the full recomputation"


# -- the tiers' terms -----------------------------------------------------------------------------------


def test_block_mean_orthogonality_is_zero_at_its_floor_of_48_for_16_blocks_of_4():
    assert block_mean_orthogonality_floor(16, 4) == 48.0
    assert block_mean_orthogonality_floor(16, 16) == 0.0
    tight = torch.eye(4).repeat(4, 1)  # 16 unit vectors in R^4 forming a tight frame: the best possible
    units = tight.unsqueeze(0).expand(3, 16, 4)
    assert block_mean_orthogonality(units).item() == pytest.approx(0.0, abs=1e-5)
    random = torch.randn(50, 16, 4)
    assert block_mean_orthogonality(random).item() > 0.0
    routed_away = tight.unsqueeze(0).expand(3, 16, 4).clone()
    routed_away[:, 12:] = 0.0  # four blocks never kept: still never below its floor
    assert block_mean_orthogonality(routed_away).item() == pytest.approx(0.0, abs=1e-5)


def test_linear_cka_is_one_for_rotated_and_scaled_copies_and_near_zero_for_independent_blocks():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 4, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=g))
    units = torch.stack([x, 3.0 * x @ rotation, torch.randn(2000, 4, generator=g), torch.zeros(2000, 4)], dim=1)
    cka = linear_cka_matrix(units)
    assert cka[0, 1].item() == pytest.approx(1.0, abs=1e-5)
    assert cka[0, 2].item() < 0.01
    assert cka[0, 3].item() == 0.0 and cka[3, 3].item() == 1.0
    units.requires_grad_(True)
    mean_off_diagonal_cka(units).backward()
    assert torch.isfinite(units.grad).all(), "a zero-variance block must not make the gradient NaN"
    assert mean_off_diagonal_cka(units[:, :2]).item() == pytest.approx(1.0, abs=1e-5)


def test_every_term_is_reported_and_every_trainable_parameter_gets_a_gradient():
    """Routers that never got a gradient and losses never added are how the original work failed."""
    for routing in ("moe", "separate", "slots"):
        model = tiny_model("sosm", mu_layers=1, block_routing=routing, **ALL_TERMS)
        ids = torch.randint(3, model.config.vocab_size, (2, 12))
        out = model(input_ids=ids, labels=ids, **_columns(model, ids))
        expected = set(model.config.aux_loss_weight_fields) - ({"routing_balance"} if routing != "moe" else set())
        assert set(out.aux_losses) == expected
        out.loss.backward()
        silent = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
        assert silent == [], f"{routing}: no gradient reached {silent}"


def test_terms_are_training_signals_only():
    model = tiny_model("sosm", **ALL_TERMS).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 8))
    out = model(input_ids=ids, labels=ids)
    assert out.aux_losses == {} and torch.equal(out.loss, out.task_loss)


def test_an_aux_head_reads_only_its_blocks():
    model = tiny_model("sosm", aux_head_weight=1.0, aux_heads={"domain": ["K", "C2"]}, aux_head_classes={"domain": 4},
                       block_routing="none")
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    out = model(input_ids=ids, domain=torch.randint(0, 4, ids.shape))
    out.aux_losses["aux_heads"].backward()
    grad = model.model.layout.blocks(model.model.embed_tokens.weight.grad)  # (V, 16, d)
    touched = {BLOCK_NAMES[b] for b in range(16) if grad[:, b].abs().sum() > 0}
    assert touched == {"K", "C2"}


def test_a_batch_without_a_single_label_gives_finite_terms_and_gradients():
    """One-token rows leave the reconstruction groups g >= 1 nothing to name, and labels of -1 leave
    the heads nothing to predict: the terms are 0, never NaN, and so are their gradients."""
    model = tiny_model("sosm", aux_head_weight=1.0, reconstruction_weight=1.0)
    ids = torch.randint(3, model.config.vocab_size, (2, 1))
    columns = {c: torch.full(ids.shape, -1) for c in model.aux_label_columns}
    out = model(input_ids=ids, labels=ids, **columns)
    assert out.aux_losses["aux_heads"].item() == 0.0 and torch.isfinite(out.aux_losses["reconstruction"])
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_missing_label_column_in_training_is_a_clear_error():
    model = tiny_model("sosm", aux_head_weight=0.5)
    ids = torch.randint(3, model.config.vocab_size, (2, 8))
    with pytest.raises(ValueError, match="the batch has no 'word_class' column"):
        model(input_ids=ids, labels=ids)


def test_reconstruction_groups_name_the_current_and_earlier_tokens_only():
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 3, 4, 5]])
    valid = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert past_token_targets(ids, valid, 0).tolist() == [[5, 6, 7, 8, 9], [-100, -100, 3, 4, 5]]
    assert past_token_targets(ids, valid, 2).tolist() == [[-100, -100, 5, 6, 7], [-100, -100, -100, -100, 3]]
    assert past_token_targets(ids, valid, 7).tolist() == [[-100] * 5, [-100] * 5]  # further back than the row
    model = tiny_model("sosm", reconstruction_weight=1.0, block_routing="none")
    term = model(input_ids=ids, attention_mask=valid.long()).aux_losses["reconstruction"]
    assert torch.isfinite(term) and term > 0


def test_moe_routing_keeps_exactly_top_k_blocks_and_its_router_learns():
    model = tiny_model("sosm", block_routing="moe", routing_top_k=3)
    captured = {}
    model.model.state_out.register_forward_hook(lambda mod, args, out: captured.__setitem__("state", out))
    ids = torch.randint(3, model.config.vocab_size, (2, 8))
    out = model(input_ids=ids, labels=ids)
    kept = (model.model.layout.blocks(captured["state"]).abs().sum(-1) > 0).sum(-1)
    assert (kept == 3).all()
    out.loss.backward()
    assert model.model.tier4.router.weight.grad.abs().sum() > 0


def test_orthogonal_block_init_starts_the_blocks_uncorrelated_over_the_vocabulary():
    model = tiny_model("sosm", block_init="orthogonal", vocab_size=200, block_routing="none")
    table = model.model.layout.blocks(model.model.embed_tokens.weight.detach())  # (V, 16, d)
    cka = linear_cka_matrix(table)
    assert cka[~torch.eye(16, dtype=torch.bool)].abs().max() < 0.05
    assert table.std().item() == pytest.approx(model.config.initializer_range, rel=0.2)


# -- what is measured -----------------------------------------------------------------------------------


def test_homonym_report_separates_senses_from_noise_and_word_identity():
    g = torch.Generator().manual_seed(0)
    word, sense_dir = torch.randn(16, generator=g), torch.randn(16, generator=g)
    states, surface, sense = [], [], []
    for s, sign in ((0, 1.0), (1, -1.0)):
        for _ in range(20):
            states.append(word + sign * sense_dir + 0.1 * torch.randn(16, generator=g))
            surface.append(7)
            sense.append(s)
    for w in range(3):  # other words, one sense each
        centre = torch.randn(16, generator=g)
        for _ in range(10):
            states.append(centre + 0.1 * torch.randn(16, generator=g))
            surface.append(w)
            sense.append(100 + w)
    report = homonym_report(torch.stack(states), torch.tensor(surface), torch.tensor(sense))
    assert report["homonyms"] == 1 and report["same_sense_groups"] == 2
    assert report["separation"] > 0.5 and report["same_sense_baseline"] < 0.05
    assert report["margin"] == pytest.approx(report["separation"] - report["same_sense_baseline"])
    assert report["random_pair_baseline"] > 0.5
    # No sense difference: the margin vanishes although raw separation is not zero.
    blurred = homonym_report(torch.stack(states)[:40] * 0 + word + 0.3 * torch.randn(40, 16, generator=g),
                             torch.tensor(surface[:40]), torch.tensor(sense[:40]))
    assert blurred["separation"] > 0 and abs(blurred["margin"]) < 0.05


def test_within_block_cosine_is_per_block_across_connected_tokens():
    units = torch.zeros(3, 2, 2)
    units[:, 0] = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    units[:, 1] = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    edges = torch.tensor([[1, 0], [2, 1]])
    torch.testing.assert_close(within_unit_cosine(units, edges), torch.tensor([0.5, -1.0]))


def test_the_collapse_report_names_its_headline_metrics_and_ablates_each_block():
    model = tiny_model("sosm", aux_head_weight=0.5)
    ids = torch.randint(3, model.config.vocab_size, (4, 16))
    g = torch.Generator().manual_seed(0)
    sense = ids * 2 + (torch.rand(ids.shape, generator=g) < 0.5).long() * (ids % 3 == 0).long()  # some homonyms
    batch = {"input_ids": ids, "sense": sense, "word_class": ids % 4, "domain": ids % 3}
    report = model.collapse_report(batch)
    for name in ("blocks.between_cka_mean", "blocks.within_cosine_mean", "homonyms.separation",
                 "homonyms.same_sense_baseline", "homonyms.random_pair_baseline", "homonyms.margin",
                 "blocks.usage_variance", "aux.word_class.accuracy", "homonyms.block.R2.separation",
                 "ablation.K.loss_rise", "ablation.K.class0"):
        assert name in report.metrics, name
    assert report.matrices["blocks.between_cka"].shape == (16, 16)
    rises = [report.metrics[f"ablation.{b}.loss_rise"] for b in BLOCK_NAMES]
    assert any(abs(r) > 0 for r in rises), "zeroing a block must change the loss"
    assert model.model.block_scale is None and model.training
