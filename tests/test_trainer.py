"""DecollapseTrainer, the weighting strategies and the callbacks."""

import math

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback, TrainerControl, TrainerState

from decollapse.trainers import (
    CollapseMonitorCallback,
    DecollapseTrainer,
    DecollapseTrainingArguments,
    LossWeighting,
    NonFiniteGuardCallback,
    NonFiniteLossError,
)

from .conftest import tiny_model


def _collate(features):
    ids = torch.tensor([f["input_ids"] for f in features])
    return {"input_ids": ids, "labels": ids.clone()}


def _data(n=64, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"input_ids": torch.randint(3, 61, (n, length), generator=g).tolist()})


def _trainer(tmp_path, model=None, callbacks=None, **kwargs):
    model = model or tiny_model("dense", head_diversity_weight=0.5)
    defaults = dict(
        output_dir=str(tmp_path),
        max_steps=12,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=4,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    defaults.update(kwargs)
    args = DecollapseTrainingArguments(**defaults)
    return DecollapseTrainer(
        model=model, args=args, train_dataset=_data(), eval_dataset=_data(16, seed=1),
        data_collator=_collate, callbacks=callbacks,
    )


def test_fixed_weighting_logs_every_term_unweighted_and_weighted(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "task_loss" in e]
    assert len(logs) == 3
    for entry in logs:
        assert {"loss", "grad_norm", "aux/head_similarity", "aux_weighted/head_similarity"} <= set(entry)
        assert entry["aux_weight/head_similarity"] == 0.5 and entry["aux_weight/task"] == 1.0
        assert entry["aux_weighted/head_similarity"] == pytest.approx(0.5 * entry["aux/head_similarity"], rel=1e-5)
        # the back-propagated total is the task loss plus the weighted term
        assert entry["loss"] == pytest.approx(entry["task_loss"] + entry["aux_weighted/head_similarity"], rel=1e-4)


def test_evaluation_reports_the_task_loss_and_each_term(tmp_path):
    trainer = _trainer(tmp_path)
    metrics = trainer.evaluate()
    model = trainer.model.eval()
    batch = _collate([{"input_ids": r} for r in _data(16, seed=1)["input_ids"]])
    with torch.no_grad():
        out = model(**batch)
    assert metrics["eval_loss"] == pytest.approx(out.task_loss.item(), rel=1e-4)
    assert metrics["eval_aux_head_similarity"] == pytest.approx(out.aux_losses["head_similarity"].item(), rel=1e-4)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-6)
    assert metrics["eval_total_loss"] > metrics["eval_loss"]


def test_warmup_ramps_the_auxiliary_weights_linearly(tmp_path):
    weighting = LossWeighting({"a": 0.4}, warmup_steps=10)
    assert [weighting.current_weights(s)["a"] for s in (0, 5, 10, 20)] == pytest.approx([0.0, 0.2, 0.4, 0.4])
    trainer = _trainer(tmp_path, aux_warmup_steps=12)
    trainer.train()
    ramp = [e["aux_weight/head_similarity"] for e in trainer.state.log_history if "task_loss" in e]
    assert ramp == pytest.approx([0.5 * 4 / 12, 0.5 * 8 / 12, 0.5])


def test_kendall_gal_starts_at_the_fixed_weights_and_learns(tmp_path):
    weighting = LossWeighting({"a": 0.25}, strategy="kendall_gal")
    assert weighting.current_weights(0)["a"] == pytest.approx(0.25)
    # With a constant term L the optimum of ½e^{-s}L + ½s is s = log L: the weight becomes 1/(2L).
    optimizer = torch.optim.SGD(weighting.parameters(), lr=0.5)
    for _ in range(400):
        total, _ = weighting(torch.tensor(0.0), {"a": torch.tensor(4.0)}, step=0)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert weighting.log_vars["a"].item() == pytest.approx(math.log(4.0), abs=1e-3)
    assert weighting.current_weights(0)["task"] == 1.0

    trainer = _trainer(tmp_path, loss_weighting="kendall_gal")
    before = trainer.loss_weighting.log_vars["head_similarity"].item()
    trainer.train()
    after = trainer.loss_weighting.log_vars["head_similarity"].item()
    assert after != pytest.approx(before, abs=1e-4), "the log-variance is optimised by the Trainer's optimizer"
    weights = [e["aux_weight/head_similarity"] for e in trainer.state.log_history if "task_loss" in e]
    assert len(set(round(w, 8) for w in weights)) > 1
    assert all(e["aux_weight/task"] == 1.0 for e in trainer.state.log_history if "task_loss" in e)


def test_unknown_aux_weight_override_is_refused(tmp_path):
    with pytest.raises(ValueError, match="nonexistent"):
        _trainer(tmp_path, aux_weights={"nonexistent": 1.0})


def _collapsed_dense():
    """Every head of every layer made an exact copy of head 0: a constructed head collapse."""
    model = tiny_model("dense")
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.attn
            nh, hd = attn.num_heads, attn.head_dim
            w = attn.qkv_proj.weight.view(3, nh, hd, -1)
            b = attn.qkv_proj.bias.view(3, nh, hd)
            w[:] = w[:, :1].clone()
            b[:] = b[:, :1].clone()
            o = attn.o_proj.weight.view(-1, nh, hd)
            o[:] = o[:, :1].clone()
    return model


def test_monitor_alarm_fires_on_a_constructed_collapse_and_can_stop_training(tmp_path):
    probe = {"input_ids": torch.randint(3, 61, (4, 16))}
    healthy = CollapseMonitorCallback(probe, every_n_steps=2, dead_unit_ceiling=None, effective_rank_floor=None)
    _trainer(tmp_path / "a", model=tiny_model("dense"), callbacks=[healthy], learning_rate=0.0).train()
    assert healthy.alarms == []

    monitor = CollapseMonitorCallback(
        probe, every_n_steps=2, dead_unit_ceiling=None, effective_rank_floor=None, stop_on_alarm=True
    )
    trainer = _trainer(tmp_path / "b", model=_collapsed_dense(), callbacks=[monitor], learning_rate=0.0)
    trainer.train()
    assert monitor.alarms and monitor.alarms[0].criterion == "similar_pair_ceiling"
    assert "heads.similar_pair_fraction" in monitor.alarms[0].message
    assert trainer.state.global_step == 2, "stop_on_alarm ends training at the alarm"
    logged = [e for e in trainer.state.log_history if any(k.startswith("collapse/") for k in e)]
    assert logged and logged[0]["collapse/layer0.heads.similar_pair_fraction"] == pytest.approx(1.0)


def test_monitor_report_criteria():
    monitor = CollapseMonitorCallback({}, effective_rank_floor=0.3, similar_pair_ceiling=0.5, dead_unit_ceiling=0.2)
    ok = {"l0.x.effective_rank_entropy_ratio": 0.9, "l0.x.similar_pair_fraction": 0.1, "l0.x.dead_share": 0.0}
    assert monitor.check_report(ok, 1) == []
    bad = {"l0.x.effective_rank_entropy_ratio": 0.1, "l1.x.similar_pair_fraction": 0.7, "l0.x.dead_share": 0.5}
    assert {a.criterion for a in monitor.check_report(bad, 1)} == {
        "effective_rank_floor", "similar_pair_ceiling", "dead_unit_ceiling"
    }


def test_stall_alarm_aux_falling_while_task_flat():
    """Seed 004's failure: routers / auxiliary losses learn while the language model does not."""
    state, control = TrainerState(), TrainerControl()
    stalled = CollapseMonitorCallback({}, stall_window=6, stop_on_alarm=True)
    for i in range(6):
        state.global_step = i
        stalled.on_log(None, state, control, logs={"task_loss": 2.0, "aux/router": 1.0 - 0.1 * i})
    assert [a.criterion for a in stalled.alarms] == ["stall"] and control.should_training_stop

    learning = CollapseMonitorCallback({}, stall_window=6)
    for i in range(6):
        learning.on_log(None, state, TrainerControl(), logs={"task_loss": 2.0 - 0.1 * i, "aux/router": 1.0 - 0.1 * i})
    assert learning.alarms == []

    # A term that halves but weighs under 1% of the task loss is not what the optimizer is busy with.
    negligible = CollapseMonitorCallback({}, stall_window=6)
    for i in range(6):
        logs = {"task_loss": 5.0, "aux/balance": 0.1 - 0.015 * i, "aux_weighted/balance": 0.01 - 0.0015 * i}
        negligible.on_log(None, state, TrainerControl(), logs=logs)
    assert negligible.alarms == []


class _NaNAfter(torch.nn.Module):
    """Wraps a model and makes its task loss NaN from the given call on."""

    def __init__(self, model, after):
        super().__init__()
        self.inner, self.after, self.calls = model, after, 0
        self.config = model.config

    def forward(self, **batch):
        out = self.inner(**batch)
        self.calls += 1
        if self.calls > self.after:
            out.task_loss = out.task_loss * float("nan")
        return out


def test_non_finite_loss_stops_before_the_update_and_names_the_term(tmp_path):
    model = _NaNAfter(tiny_model("dense"), after=3)
    trainer = _trainer(tmp_path, model=model, callbacks=[NonFiniteGuardCallback()], remove_unused_columns=False)
    with pytest.raises(NonFiniteLossError, match="'task_loss'.*step 3"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _NaNGradient(torch.nn.Module):
    """A finite loss whose gradient is NaN: clipping would spread it into every weight."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.calls = model, 0
        self.config = model.config

    def forward(self, **batch):
        self.calls += 1
        if self.calls > 2:
            weight = self.inner.model.embed_positions.weight
            weight.register_hook(lambda grad: grad * float("nan")) if weight.requires_grad else None
        return self.inner(**batch)


def test_non_finite_gradient_is_refused_before_the_optimizer_step(tmp_path):
    model = _NaNGradient(tiny_model("dense"))
    trainer = _trainer(tmp_path, model=model, callbacks=[NonFiniteGuardCallback()], remove_unused_columns=False)
    with pytest.raises(NonFiniteLossError, match="'gradient'"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # Without the guard the same step corrupts every weight, and only the next forward notices.
    unguarded = _NaNGradient(tiny_model("dense"))
    with pytest.raises(NonFiniteLossError, match="'task_loss'.*step 3"):
        _trainer(tmp_path / "u", model=unguarded, remove_unused_columns=False).train()
    assert not all(torch.isfinite(p).all() for p in unguarded.parameters())


def test_every_term_reaches_report_to_integrations(tmp_path):
    """Per-term logging goes through the Trainer's own logging, so TensorBoard receives it."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    probe = {"input_ids": torch.randint(3, 61, (2, 16))}
    trainer = _trainer(tmp_path, report_to=["tensorboard"], callbacks=[CollapseMonitorCallback(probe, every_n_steps=4)])
    trainer.train()
    event_files = list(tmp_path.rglob("events.out.tfevents*"))
    assert event_files
    tags = set()
    for path in event_files:
        accumulator = EventAccumulator(str(path.parent))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    for tag in ("train/task_loss", "train/aux/head_similarity", "train/aux_weighted/head_similarity",
                "train/aux_weight/head_similarity", "train/grad_norm", "train/collapse/layer0.heads.similar_pair_fraction"):
        assert tag in tags, f"{tag} missing from TensorBoard; have {sorted(tags)[:12]}"


def test_with_model_init_every_train_starts_afresh_learned_weights_included(tmp_path):
    """Trainer.hyperparameter_search trains one Trainer once per trial, each time on a fresh model from
    model_init: the learned Kendall-Gal log-variances must start afresh too, or a trial would begin
    where the previous one ended. Same seed, fresh start: the second run repeats the first."""
    args = DecollapseTrainingArguments(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=4,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, loss_weighting="kendall_gal",
    )
    trainer = DecollapseTrainer(
        model_init=lambda: tiny_model("dense", head_diversity_weight=0.5), args=args, train_dataset=_data(),
        data_collator=_collate,
    )

    def run():
        trainer.train()
        return [(e["loss"], e["aux_weight/head_similarity"]) for e in trainer.state.log_history if "task_loss" in e]

    first = run()
    assert len({w for _, w in first}) > 1, "the weight is learned within a run"
    assert run() == first


class _LogVarProbe(TrainerCallback):
    """Records each optimizer step's log-variance before the step and its gradient at the step."""

    def __init__(self, weighting, name):
        self.param, self.before, self.grads = weighting.log_vars[name], [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self.before.append(self.param.item())

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append(self.param.grad.item())


@pytest.mark.parametrize("accumulation", [1, 2])
def test_kendall_gal_steps_on_this_steps_gradient_only(tmp_path, accumulation):
    """The Trainer zeroes the model's gradients, not those of the log-variances beside it: each optimizer
    step must see d/ds [½e^{-s}·L + ½s] = ½ - ½e^{-s}·L of its own batch, not a sum since step 0."""
    trainer = _trainer(tmp_path, loss_weighting="kendall_gal", logging_steps=1, max_steps=4,
                       per_device_train_batch_size=8 // accumulation, gradient_accumulation_steps=accumulation)
    probe = _LogVarProbe(trainer.loss_weighting, "head_similarity")
    trainer.add_callback(probe)
    trainer.train()
    terms = [e["aux/head_similarity"] for e in trainer.state.log_history if "task_loss" in e]
    expected = [0.5 - 0.5 * math.exp(-s) * term for s, term in zip(probe.before, terms)]
    assert len(probe.grads) == 4
    assert probe.grads == pytest.approx(expected, rel=1e-4, abs=1e-6)
