"""Contracts every registered architecture must keep. Parametrized over the registry, so an
architecture added later is covered without touching this file."""

import ast
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

from decollapse.modeling.diagnostics import CollapseReport
from decollapse.registry import ARCHITECTURES, OBJECTIVE_AUTO_CLASSES

from .conftest import tiny_config, tiny_model

PACKAGE = Path(__file__).resolve().parents[1] / "decollapse"
CAUSAL = [a for a in ARCHITECTURES if "causal_lm" in ARCHITECTURES[a].objectives]
MASKED = [a for a in ARCHITECTURES if "masked_lm" in ARCHITECTURES[a].objectives]
# Heads served by a transformers Auto class; objectives without one (TSDAE, diffusion) take other
# inputs and are covered by their architecture's own tests.
ALL_HEADS = [(a, o) for a in ARCHITECTURES for o in ARCHITECTURES[a].objectives if o in OBJECTIVE_AUTO_CLASSES]


@pytest.mark.parametrize("arch", CAUSAL)
def test_causal_lm_cannot_see_the_future(arch):
    """Logits at position t are unchanged when any token after t changes (the leak behind the DAWN
    repository's retracted perplexity, shared/specs/dawn.md §8)."""
    model = tiny_model(arch).eval()
    torch.manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (2, 24))
    base = model(input_ids=ids).logits
    for t in (0, 7, 22):
        changed = ids.clone()
        changed[:, t + 1 :] = torch.randint(3, model.config.vocab_size, changed[:, t + 1 :].shape)
        logits = model(input_ids=changed).logits
        torch.testing.assert_close(logits[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-5)
        assert not torch.allclose(logits[:, t + 1 :], base[:, t + 1 :]), "future tokens should change later logits"


@pytest.mark.parametrize("arch", CAUSAL)
def test_causal_lm_is_padding_invariant(arch):
    """Left padding (masked) leaves the real tokens' logits unchanged."""
    model = tiny_model(arch).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    base = model(input_ids=ids).logits
    padded = torch.cat([torch.zeros(2, 5, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 12, dtype=torch.long)], dim=1)
    logits = model(input_ids=padded, attention_mask=mask).logits[:, 5:]
    torch.testing.assert_close(logits, base, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", MASKED)
def test_masked_lm_padding_never_enters(arch):
    """Right padding changes nothing at real positions, whatever the padding tokens are."""
    model = tiny_model(arch, objective="masked_lm").eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    base = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    for filler in (0, 7):
        padded = torch.cat([ids, torch.full((2, 4), filler)], dim=1)
        mask = torch.cat([torch.ones_like(ids), torch.zeros(2, 4, dtype=torch.long)], dim=1)
        logits = model(input_ids=padded, attention_mask=mask).logits[:, :12]
        torch.testing.assert_close(logits, base, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch,objective", ALL_HEADS)
def test_save_load_round_trip_gives_identical_logits(arch, objective, tmp_path):
    import decollapse  # noqa: F401

    model = tiny_model(arch, objective=objective).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 16))
    before = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    auto = AutoModelForCausalLM if objective == "causal_lm" else AutoModelForMaskedLM
    loaded = auto.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert torch.equal(loaded(input_ids=ids).logits, before)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), type(model.config))
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base).__name__ == ARCHITECTURES[arch].models["AutoModel"]


@pytest.mark.parametrize("arch,objective", ALL_HEADS)
def test_loss_is_task_plus_weighted_aux_terms(arch, objective):
    """The output contract: scalar unweighted terms, loss = task + Σ config weight × term."""
    config = tiny_config(arch, objective=objective)
    weights = {name: 0.5 for name in config.aux_loss_weight_fields}
    model = tiny_model(arch, objective=objective, **{config.aux_loss_weight_fields[k]: w for k, w in weights.items()})
    ids = torch.randint(3, model.config.vocab_size, (2, 16))
    labels = ids.clone()
    if objective == "masked_lm":
        labels[:, ::2] = -100
    out = model(input_ids=ids, labels=labels)
    assert set(out.aux_losses) == set(weights)
    expected = out.task_loss + sum(0.5 * v for v in out.aux_losses.values())
    torch.testing.assert_close(out.loss, expected)
    for term in out.aux_losses.values():
        assert term.dim() == 0 and torch.isfinite(term)
    out.loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_zero_aux_weights_compute_no_terms(arch):
    config = tiny_config(arch)
    model = tiny_model(arch, **{f: 0.0 for f in config.aux_loss_weight_fields.values()})
    ids = torch.randint(3, model.config.vocab_size, (2, 8))
    out = model(input_ids=ids, labels=ids)
    assert out.aux_losses == {}
    torch.testing.assert_close(out.loss, out.task_loss)


@pytest.mark.parametrize("arch,objective", ALL_HEADS)
def test_collapse_report_has_finite_named_metrics(arch, objective):
    model = tiny_model(arch, objective=objective)
    ids = torch.randint(3, model.config.vocab_size, (3, 16))
    report = model.collapse_report({"input_ids": ids, "domain": torch.randint(0, 4, (3, 16))})
    assert isinstance(report, CollapseReport)
    assert report.metrics and all(isinstance(v, float) for v in report.metrics.values())
    assert all(v == v for v in report.metrics.values()), "no NaN metric"
    assert model.training, "collapse_report restores the training mode"


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_config_validation_names_the_field(arch):
    with pytest.raises(ValueError, match="hidden_size"):
        tiny_config(arch, hidden_size=-4)
    with pytest.raises(ValueError, match="objective"):
        tiny_config(arch, objective="seq2seq")


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield 0, alias.name
        elif isinstance(node, ast.ImportFrom):
            yield node.level, node.module or ""


@pytest.mark.parametrize(
    "path", sorted((PACKAGE / "modeling").glob("*.py")) + sorted((PACKAGE / "configuration").glob("*.py")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_modeling_and_configuration_files_are_hub_portable(path):
    """A Hub remote-code bundle copies a file and its same-folder relative imports only: modeling and
    configuration files import torch, transformers, the standard library and siblings; a modeling
    file's only cross-folder import is its own configuration (the export rewrites that one line)."""
    import sys

    allowed_roots = {"torch", "transformers", "__future__"} | set(sys.stdlib_module_names)
    for level, module in _imports(path):
        if level == 0:
            assert module.split(".")[0] in allowed_roots, f"{path.name} imports {module}"
        elif level == 1:
            assert "." not in module, f"{path.name}: relative import .{module} must be a sibling module"
        else:
            assert path.parent.name == "modeling" and module == f"configuration.{path.stem}", (
                f"{path.name}: only its own configuration may be imported from outside the folder"
            )
