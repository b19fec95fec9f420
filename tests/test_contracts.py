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


# Each architecture's tiny model and each of its registered variants (settings that change what
# attends to what), so that no setting can leak the future or read padding unnoticed.
CAUSAL_VARIANTS = [
    pytest.param(a, v, id=f"{a}-{v}" if v else a)
    for a in CAUSAL
    for v in ["", *ARCHITECTURES[a].variants]
]


def _variant(arch: str, variant: str) -> dict:
    return ARCHITECTURES[arch].variants[variant] if variant else {}


@pytest.mark.parametrize("arch,variant", CAUSAL_VARIANTS)
def test_causal_lm_cannot_see_the_future(arch, variant):
    """Logits at position t are unchanged when any token after t changes (the leak behind the DAWN
    repository's retracted perplexity)."""
    model = tiny_model(arch, **_variant(arch, variant)).eval()
    torch.manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (2, 24))
    base = model(input_ids=ids).logits
    for t in (0, 7, 22):
        changed = ids.clone()
        changed[:, t + 1 :] = torch.randint(3, model.config.vocab_size, changed[:, t + 1 :].shape)
        logits = model(input_ids=changed).logits
        torch.testing.assert_close(logits[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-5)
        assert not torch.allclose(logits[:, t + 1 :], base[:, t + 1 :]), "future tokens should change later logits"


@pytest.mark.parametrize("arch,variant", CAUSAL_VARIANTS)
def test_causal_lm_is_padding_invariant(arch, variant):
    """Left padding (masked) leaves the real tokens' logits unchanged."""
    model = tiny_model(arch, **_variant(arch, variant)).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    base = model(input_ids=ids).logits
    padded = torch.cat([torch.zeros(2, 5, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 12, dtype=torch.long)], dim=1)
    logits = model(input_ids=padded, attention_mask=mask).logits[:, 5:]
    torch.testing.assert_close(logits, base, rtol=0, atol=1e-5)


def _packed(model, lengths=(9, 11)):
    """Two documents and the row that packs them (position ids restarting at the second)."""
    torch.manual_seed(2)
    docs = [torch.randint(3, model.config.vocab_size, (1, n)) for n in lengths]
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    return docs, torch.cat(docs, dim=1), positions


def _check_packed_documents(model):
    docs, packed, positions = _packed(model)
    if not model.config.supports_packed_documents:
        with pytest.raises(ValueError, match="packed documents"):
            model(input_ids=packed, position_ids=positions)
        return
    logits = model(input_ids=packed, position_ids=positions).logits
    start = 0
    for doc in docs:
        alone = model(input_ids=doc).logits
        torch.testing.assert_close(logits[:, start : start + doc.shape[1]], alone, rtol=0, atol=1e-5)
        start += doc.shape[1]


@pytest.mark.parametrize("arch,variant", CAUSAL_VARIANTS)
def test_causal_lm_packed_documents_never_read_each_other(arch, variant):
    """Documents packed into one row (position ids restarting per document, as the text loader packs
    them) give each document exactly the logits it has alone; a configuration that cannot keep them
    apart refuses the row instead of reading across."""
    _check_packed_documents(tiny_model(arch, **_variant(arch, variant)).eval())


@pytest.mark.parametrize("arch", MASKED)
def test_masked_lm_packed_documents_never_read_each_other(arch):
    _check_packed_documents(tiny_model(arch, objective="masked_lm").eval())


# The variants that read packed rows (the others refuse them, which the test above checks).
PACKING_CAUSAL_VARIANTS = [
    p for p in CAUSAL_VARIANTS if tiny_config(p.values[0], **_variant(*p.values)).supports_packed_documents
]


@pytest.mark.parametrize("arch,variant", PACKING_CAUSAL_VARIANTS)
def test_packed_documents_stay_causal(arch, variant):
    """Within a packed row, changing a later token changes nothing before it."""
    model = tiny_model(arch, **_variant(arch, variant)).eval()
    _, packed, positions = _packed(model)
    base = model(input_ids=packed, position_ids=positions).logits
    for t in (3, 12):
        changed = packed.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % model.config.vocab_size
        logits = model(input_ids=changed, position_ids=positions).logits
        torch.testing.assert_close(logits[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-5)


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
    # A model trained with ground-truth label columns (e.g. SOSM's auxiliary heads) declares them.
    columns = {c: torch.randint(-1, 4, ids.shape) for c in getattr(model, "aux_label_columns", ())}
    out = model(input_ids=ids, labels=labels, **columns)
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
    """Every modeling and configuration file obeys the rules the Hub bundler flattens by: torch,
    transformers and the standard library, plus relative imports of modules in the two folders
    (a sibling helper, a sibling architecture's block, a configuration). Checked per file, so a file no
    registered architecture reaches yet cannot break a later export."""
    from decollapse.remote_code import _check_absolute, _target

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                _check_absolute(alias.name, path.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                _check_absolute(node.module or "", path.name)
            else:
                folder, module = _target(node, path.parent.name, path.name)
                assert (PACKAGE / folder / f"{module}.py").is_file(), f"{path.name}: {module} does not exist"
                assert node.col_offset == 0, f"{path.name}: line {node.lineno}: relative imports live at the top"


# -- generation ----------------------------------------------------------------------------------------

GENERATORS = [a for a in CAUSAL if hasattr(ARCHITECTURES[a].model_for_objective("causal_lm"), "generate")]


@pytest.mark.parametrize("arch", GENERATORS)
def test_greedy_generation_with_the_cache_equals_generation_without_it(arch):
    """The KV cache is a speed-up, never a different answer: transformers renamed the generation cache
    argument in 5.24 (``past_key_values`` -> ``cache``), and a model that missed the rename generated
    other tokens with the cache than without it, with no error."""
    model = tiny_model(arch).eval()
    torch.manual_seed(2)
    prompt = torch.randint(3, model.config.vocab_size, (2, 6))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # one left-padded row
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    recomputed = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (2, 16)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("arch", GENERATORS)
def test_a_cached_generation_step_feeds_only_the_new_token(arch):
    """With a cache each step after the prompt embeds one new token, not the whole prefix again (an
    architecture without a KV cache declares ``use_cache=False`` and recomputes, which is then checked)."""
    model = tiny_model(arch).eval()
    widths = []
    hook = model.get_input_embeddings().register_forward_hook(lambda mod, args, out: widths.append(args[0].shape[1]))
    prompt = torch.randint(3, model.config.vocab_size, (1, 5))
    try:
        model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    finally:
        hook.remove()
    if model.config.use_cache:
        assert widths == [5, 1, 1, 1]
    else:
        assert widths == [5, 6, 7, 8]


@pytest.mark.parametrize("arch", GENERATORS)
def test_the_old_cache_argument_name_still_works_with_a_deprecation_warning(arch):
    model = tiny_model(arch).eval()
    ids = torch.randint(3, model.config.vocab_size, (1, 6))
    if not model.config.use_cache:
        with pytest.raises(ValueError, match="cache"):
            model(input_ids=ids[:, 3:], cache=object())
        return
    first = model(input_ids=ids[:, :3], use_cache=True)
    with pytest.warns(FutureWarning, match="past_key_values"):
        step = model(input_ids=ids[:, 3:], past_key_values=first.cache, use_cache=True)
    torch.testing.assert_close(step.logits, model(input_ids=ids).logits[:, 3:], rtol=0, atol=1e-5)


# -- lengths -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,objective", ALL_HEADS)
def test_a_sequence_longer_than_the_positions_is_a_clear_value_error(arch, objective):
    model = tiny_model(arch, objective=objective).eval()
    limit = model.config.max_position_embeddings
    ids = torch.randint(3, model.config.vocab_size, (1, limit + 1))
    with pytest.raises(ValueError, match=f"exceeds max_position_embeddings={limit}"):
        model(input_ids=ids)
    model(input_ids=ids[:, :limit])  # the limit itself is fine


@pytest.mark.parametrize("arch", GENERATORS)
def test_generating_past_the_positions_is_a_clear_value_error(arch):
    model = tiny_model(arch).eval()
    limit = model.config.max_position_embeddings
    prompt = torch.randint(3, model.config.vocab_size, (1, limit - 2))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)


# -- gradient accumulation -------------------------------------------------------------------------------


def _labelled_batch(objective: str, vocab: int, rows: int = 4, length: int = 12):
    torch.manual_seed(3)
    ids = torch.randint(3, vocab, (rows, length))
    labels = ids.clone()
    if objective == "masked_lm":
        # Uneven masking, so the micro-batches hold different numbers of labelled tokens.
        labels[torch.rand(rows, length) < torch.linspace(0.2, 0.8, rows)[:, None]] = -100
        labels[:, 0] = ids[:, 0]
    else:
        labels[2:, :4] = -100  # padding-like positions in the second half only
    return ids, labels


@pytest.mark.parametrize("arch,objective", ALL_HEADS)
def test_loss_kwargs_make_accumulated_gradients_equal_the_full_batch(arch, objective):
    """transformers' loss-kwargs convention, as the Trainer drives it under gradient accumulation: each
    micro-batch gets the step's ``num_items_in_batch`` and returns ``sum / num_items``, so the summed
    micro-batch gradients equal the full batch's (a swallowed kwarg doubled the loss at 2 steps)."""
    model = tiny_model(arch, objective=objective)
    assert model.accepts_loss_kwargs is True, "declare whether forward normalises by num_items_in_batch"
    for field in model.config.aux_loss_weight_fields.values():
        setattr(model.config, field, 0.0)  # auxiliary terms are batch statistics; the task loss is exact
    ids, labels = _labelled_batch(objective, model.config.vocab_size)
    model.zero_grad()
    full = model(input_ids=ids, labels=labels).loss
    full.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    counted = labels[:, 1:] if objective == "causal_lm" else labels
    num_items = counted.ne(-100).sum()
    model.zero_grad()
    total = 0.0
    for half in (slice(0, 2), slice(2, 4)):
        loss = model(input_ids=ids[half], labels=labels[half], num_items_in_batch=num_items).loss
        loss.backward()
        total += loss.detach()
    torch.testing.assert_close(total, full.detach(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch,objective", ALL_HEADS)
def test_plain_trainer_reports_the_same_loss_and_gradient_with_accumulation(arch, objective, tmp_path):
    """The whole path through a plain ``transformers.Trainer``: one step of batch 4 and one step of
    2 x 2 accumulated report the same loss and the same gradient norm."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    ids, labels = _labelled_batch(objective, tiny_config(arch).vocab_size)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
    logged = []
    for batch, steps in ((4, 1), (2, 2)):
        model = tiny_model(arch, objective=objective)
        for field in model.config.aux_loss_weight_fields.values():
            setattr(model.config, field, 0.0)
        args = TrainingArguments(
            output_dir=str(tmp_path / f"b{batch}"), per_device_train_batch_size=batch, gradient_accumulation_steps=steps,
            max_steps=1, learning_rate=0.0, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
            disable_tqdm=True, dataloader_drop_last=False, seed=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        log = next(entry for entry in trainer.state.log_history if "loss" in entry)
        logged.append((log["loss"], log["grad_norm"]))
    (loss_1, norm_1), (loss_2, norm_2) = logged
    assert loss_2 == pytest.approx(loss_1, rel=1e-4)
    assert norm_2 == pytest.approx(norm_1, rel=1e-4)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_gradient_checkpointing_is_refused_clearly(arch):
    """Not supported (docs/ARCHITECTURE.md): asking for it (transformers 5.24 calls it activation
    checkpointing) is an error, never a silent no-op."""
    model = tiny_model(arch)
    assert model.supports_gradient_checkpointing is False
    with pytest.raises(ValueError, match="does not support activation checkpointing"):
        model.activation_checkpointing_enable()
