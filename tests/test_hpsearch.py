"""`decollapse sweep`: trials through Trainer.hyperparameter_search(backend="optuna"), selected on
validation only, the best trial trained again and tested once; bad input is one line, exit 2, nothing
written. optuna is in the `test` extra so that CI runs these for real."""

import json
import math
import sys

import optuna
import pytest

import decollapse.hpsearch as hpsearch
from decollapse.cli import main
from decollapse.hpsearch import OPTIMIZERS, SearchSpace, SweepJob, load_data, plan_sweep, search
from decollapse.registry import ARCHITECTURES
from decollapse.runner import TrainJob, UsageError, plan

from .conftest import TINY
from .test_cli import TINY_CORPUS, _leftovers

STEPS = 6
TINY_DENSE = ["hidden_size=16", "num_attention_heads=2"]
SWEEP = ["--no-progress", "--set", f"train.max_steps={STEPS}", *TINY_CORPUS, *TINY_DENSE]
OPTIMIZER_CLASSES = {"adamw_torch": "AdamW", "adafactor": "Adafactor"}


def _sweep(tmp_path, *extra, trials=2, name="sweep"):
    out = tmp_path / name
    return main(["sweep", "dense", "--trials", str(trials), "--output-dir", str(out), *SWEEP, *extra]), out


def _in_space(hp, max_steps):
    low, high = SearchSpace(max_steps).warmup_range()
    assert 1e-5 <= hp["learning_rate"] <= 9e-4 and hp["optim"] in OPTIMIZERS
    assert low <= hp["warmup_steps"] <= high and 0.01 <= hp["weight_decay"] <= 0.1


def _assert_applied(trial):
    """The trial trained with what it sampled: the optimizer class, learning rate, decay and warm-up."""
    hp = trial["hyperparameters"] if isinstance(trial, dict) else trial.hyperparameters
    record = trial if isinstance(trial, dict) else vars(trial)
    assert record["optimizer"] == OPTIMIZER_CLASSES[hp["optim"]]
    assert record["applied"] == {k: hp[k] for k in ("learning_rate", "weight_decay", "warmup_steps")}


def test_sweep_selects_on_validation_and_tests_only_the_rerun_of_the_best(tmp_path, capsys):
    code, out = _sweep(tmp_path)
    assert code == 0
    printed = capsys.readouterr().out
    payload = json.loads((out / "trials.json").read_text())
    trials = payload["trials"]
    assert [t["number"] for t in trials] == [0, 1] and all(t["state"] == "complete" for t in trials)
    for trial in trials:
        _in_space(trial["hyperparameters"], STEPS)
        _assert_applied(trial)
        assert trial["steps"] == STEPS, "no trial is pruned"
        # Scored on the weights the trial ends with (eval_steps=10 > 6 steps: the one evaluation is the last).
        assert trial["validation_curve"] == {str(STEPS): trial["validation_loss"]}
        assert not any("test" in key for key in trial), "a trial never sees the test split"
    assert trials[0]["hyperparameters"] != trials[1]["hyperparameters"]
    assert trials[0]["validation_loss"] != trials[1]["validation_loss"]

    best = payload["best"]
    assert best["trial"] == min(trials, key=lambda t: t["validation_loss"])["number"]
    run = json.loads((out / "best" / "metrics.json").read_text())
    for key, value in best["hyperparameters"].items():
        assert run["recipe"][key] == value, "the best run trains the best trial's hyper-parameters"
    # Same seed, same batches, same hyper-parameters: the rerun is the best trial, to the last bit here.
    assert run["metrics"]["validation_loss"] == pytest.approx(best["validation_loss"], rel=1e-6)
    assert best["rerun_reproduces_trial"] is True
    assert best["test"]["test_perplexity"] == run["metrics"]["test_perplexity"]
    assert (out / "best" / "model.safetensors").is_file() and (out / "best" / "diagnostics.json").is_file()

    report = (out / "report.md").read_text()
    assert "| trial | learning_rate | optim | warmup_steps | weight_decay | val loss |" in report
    assert f"**{best['trial']}** (best)" in report and best["train_command"] in report
    assert printed.count("test perplexity") == 1, "the test result is printed once, for the best only"
    assert "[2/2] trial 1: validation loss" in printed and report in printed
    assert _leftovers(tmp_path) == []

    # The sampler is seeded with the run's seed: a seeded study over the same space draws these trials.
    study = optuna.create_study(sampler=hpsearch.sampler(0))
    study.optimize(lambda trial: float(len(SearchSpace(STEPS)(trial))), n_trials=2)
    assert [t.params for t in study.trials] == [t["hyperparameters"] for t in trials]


def test_a_diverged_trial_is_recorded_and_the_search_goes_on(tmp_path, capsys, monkeypatch):
    sampled = SearchSpace.__call__

    def first_trial_diverges(self, trial):
        return {**sampled(self, trial), **({"learning_rate": 1e30} if trial.number == 0 else {})}

    monkeypatch.setattr(SearchSpace, "__call__", first_trial_diverges)
    # A masked LM: its seeded masking collator drew masks for trial 0, and trial 1 must draw afresh.
    code, out = _sweep(tmp_path, "objective=masked_lm")
    assert code == 0
    failed, ok = json.loads((out / "trials.json").read_text())["trials"]
    assert failed["state"] == "failed" and "non-finite" in failed["error"] and failed["validation_loss"] is None
    assert ok["state"] == "complete"
    best = json.loads((out / "trials.json").read_text())["best"]
    # The rerun starts from nothing; trial 1 came after a diverged trial and must match it exactly.
    assert best["trial"] == 1 and best["rerun_validation_loss"] == best["validation_loss"]
    assert "trial 0: diverged" in capsys.readouterr().out
    assert "Trial 0 diverged" in (out / "report.md").read_text()

    # When every trial diverges there is nothing to select: one line, nothing written.
    monkeypatch.setattr(SearchSpace, "__call__", lambda self, trial: {**sampled(self, trial), "learning_rate": 1e30})
    code, out = _sweep(tmp_path, trials=1, name="all-diverge")
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "every one of the 1 trials diverged" in err[0]
    assert not out.exists() and _leftovers(tmp_path) == []


def _tiny_settings(arch: str) -> dict[str, str]:
    shape = {k: v for k, v in {**TINY, **ARCHITECTURES[arch].tiny}.items() if k != "vocab_size"}  # the corpus's
    settings = {k: json.dumps(v) if isinstance(v, dict) else str(v) for k, v in shape.items()}
    settings.update(item.split("=", 1) for item in TINY_CORPUS)
    return {**settings, "train.max_steps": "2"}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_architecture_is_searched_on_its_validation_loss(arch, tmp_path):
    """One trial of two steps per architecture and objective head: the sampled hyper-parameters reach
    its optimizer and its score is its validation task loss."""
    parts = plan_sweep(SweepJob(arch, trials=1, output_dir=tmp_path / "out", settings=_tiny_settings(arch)))
    dataset, tokenizer, _ = load_data(TrainJob(arch, settings=parts["settings"]), parts)
    data = {split: dataset[split] for split in ("train", "validation")}
    records, best = search(parts, data, tokenizer, 1, tmp_path / "scratch", show_progress=False)
    (trial,) = records
    assert best == 0 and trial.state == "complete" and trial.steps == 2
    assert math.isfinite(trial.validation_loss) and trial.validation_curve == {2: trial.validation_loss}
    _in_space(trial.hyperparameters, 2)
    _assert_applied(trial)
    assert not (tmp_path / "out").exists(), "the search alone writes nothing to the output folder"


def test_a_trial_stopped_by_an_alarm_is_scored_where_it_stopped(tmp_path, monkeypatch):
    """With stop_on_alarm a trial ends early; its score must be the validation loss of the weights it
    ends with, not of the last periodic evaluation before the alarm."""
    from decollapse.trainers import CollapseAlarm, CollapseMonitorCallback

    monkeypatch.setattr(
        CollapseMonitorCallback, "check_report",
        lambda self, metrics, step: [CollapseAlarm(step, "forced", "forced alarm")] if step == 3 else [],
    )
    settings = {**_tiny_settings("dense"), "train.max_steps": "6", "train.eval_steps": "2",
                "train.monitor_every": "1", "train.stop_on_alarm": "true"}
    parts = plan_sweep(SweepJob("dense", trials=1, output_dir=tmp_path / "out", settings=settings))
    dataset, tokenizer, _ = load_data(TrainJob("dense", settings=parts["settings"]), parts)
    data = {split: dataset[split] for split in ("train", "validation")}
    (trial,), _ = search(parts, data, tokenizer, 1, tmp_path / "scratch", show_progress=False)
    assert trial.steps == 3 and [a["criterion"] for a in trial.alarms] == ["forced"]
    assert list(trial.validation_curve) == [2, 3] and trial.validation_loss == trial.validation_curve[3]


def test_missing_optuna_names_the_extra_before_anything_is_built(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` now raises ImportError

    def no_data(*args, **kwargs):
        raise AssertionError("data was built before optuna was checked")

    monkeypatch.setattr(hpsearch, "load_data", no_data)
    code, out = _sweep(tmp_path)
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'decollapse[sweep]'" in err[0]
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize(("argv", "message"), [
    (["--trials", "0"], "--trials 0: expected a positive integer"),
    (["--trials", "2", "--set", "learning_rate=1e-3"], "--set learning_rate: the sweep searches learning_rate"),
    (["--trials", "2", "--set", "train.optim=sgd"], "--set train.optim: the sweep searches optim"),
    (["--trials", "2", "--seed", "1", "--set", "train.seed=2"], "--seed 1: given both"),
    (["--trials", "2", "--set", "hiden_size=16"], "did you mean hidden_size"),
    (["--trials", "2", "--max-steps", "0"], "--max-steps 0"),
])
def test_bad_sweep_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["sweep", "dense", "--output-dir", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("decollapse: error:") and message in err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_optim_is_a_train_knob_resolved_before_any_work(tmp_path):
    """The best trial's optimizer must be reproducible with `decollapse train --set optim=...`."""
    parts = plan(TrainJob("dense", output_dir=tmp_path / "a", settings={"optim": "adafactor"}))
    assert parts["recipe"].optim == "adafactor"
    for name, message in (("nope", "not a valid OptimizerNames"), ("galore_adamw", "--set optim=galore_adamw")):
        with pytest.raises(UsageError, match=message):
            plan(TrainJob("dense", output_dir=tmp_path / "b", settings={"optim": name}))
