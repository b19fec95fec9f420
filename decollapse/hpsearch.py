"""``decollapse sweep``: a hyper-parameter search for any registered architecture, through
``transformers.Trainer.hyperparameter_search(backend="optuna")``.

Every trial is a ``decollapse train`` run of the same recipe, corpus, initialisation seed and batch
order (``train.seed``, the Trainer's ``data_seed``): trials differ only by the searched
hyper-parameters. Each trial is scored by its validation loss (the task loss, never a regulariser) at
its last step, and the search minimises it; the test split is never given to a trial. The best
trial's hyper-parameters are then trained once more as an ordinary ``decollapse train`` run into
``DIR/best``, which evaluates the test split once, for that run only.

Why train the best trial again rather than keep its weights: the search would otherwise have to
save every trial's model until it knows which is best; the rerun costs one more trial and leaves
an ordinary, complete run folder (checkpoint, collapse report, plots), made by the same code as
``decollapse train``. The rerun starts from the same seed as the trial, so it reproduces the
trial's validation loss; ``trials.json`` records both, and a difference is reported.

The default space (``SearchSpace``): learning rate 1e-5 to 9e-4 (log-uniform), optimizer AdamW
(``adamw_torch``) or Adafactor (``adafactor``), warm-up 100 to 500 steps, weight decay 0.01 to 0.1
(uniform). A warm-up as long as the run would never train at the learning rate being searched, so
for runs shorter than 1000 steps the warm-up range is scaled by ``max_steps / 1000`` (10% to 50% of
the run): scaled, not clipped, so trials keep distinct warm-ups. Trials are drawn by optuna's TPE
sampler seeded with the run's seed (its first 10 trials are seeded random draws), so the same
command gives the same trials; no trial is pruned, so every trial trains its full budget.

Inside trials the collapse monitor runs at ``monitor_every`` as in ``decollapse train`` (alarms are
recorded per trial; ``stop_on_alarm`` ends a trial, which is then scored at the step it stopped);
the per-run extras are left to the best run: the final collapse report, plots, checkpoint, and the
non-finite guard's copy of the last good weights (a diverged trial is recorded as failed and the
search goes on).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from transformers import set_seed
from transformers.trainer_callback import ProgressCallback, TrainerCallback

from .runner import (
    SYNTHETIC,
    TrainJob,
    UsageError,
    build_collator,
    build_model,
    default_output_dir,
    load_data,
    plan,
    probe_batch,
    publish,
    run,
    training_arguments,
)
from .trainers import (
    CollapseMonitorCallback,
    DecollapseTrainer,
    NonFiniteGuardCallback,
    NonFiniteLossError,
    QuietProgressCallback,
    StepUpdateCallback,
)

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'decollapse[sweep]'"
LEARNING_RATE = (1e-5, 9e-4)  # log-uniform
OPTIMIZERS = ("adamw_torch", "adafactor")
WARMUP_STEPS = (100, 500)
WEIGHT_DECAY = (0.01, 0.1)
# Runs shorter than this scale the warm-up range down in proportion, so its longest warm-up is half
# the run: a warm-up over the whole run would never train at the learning rate being searched.
FULL_WARMUP_RANGE_STEPS = 2 * WARMUP_STEPS[1]
SEARCHED = ("learning_rate", "optim", "warmup_steps", "weight_decay")
SEED_KEY = "train.seed"
# A rerun of the best trial starts from the trial's seed and batches; a larger relative difference
# in validation loss than this is reported (bit-for-bit on one machine; kernels may differ elsewhere).
RERUN_TOLERANCE = 1e-4


class AllTrialsFailed(RuntimeError):
    """No trial finished with a finite loss: there is nothing to select."""


def require_optuna():
    """optuna, or a UsageError naming the extra that installs it (checked before anything is built)."""
    try:
        import optuna
    except ImportError:
        raise UsageError(f"decollapse sweep needs optuna, which is not installed: {INSTALL_HINT}") from None
    return optuna


@dataclass(frozen=True)
class SearchSpace:
    """The default search space for a run of ``max_steps`` optimizer steps; called by the Trainer with
    an optuna trial, returns ``TrainingArguments`` fields (which are ``decollapse train`` knobs too)."""

    max_steps: int

    def warmup_range(self) -> tuple[int, int]:
        scale = min(1.0, self.max_steps / FULL_WARMUP_RANGE_STEPS)
        return int(WARMUP_STEPS[0] * scale), int(WARMUP_STEPS[1] * scale)

    def __call__(self, trial) -> dict[str, Any]:
        return {
            "learning_rate": trial.suggest_float("learning_rate", *LEARNING_RATE, log=True),
            "optim": trial.suggest_categorical("optim", OPTIMIZERS),
            "warmup_steps": trial.suggest_int("warmup_steps", *self.warmup_range()),
            "weight_decay": trial.suggest_float("weight_decay", *WEIGHT_DECAY),
        }

    def describe(self) -> dict[str, Any]:
        low, high = self.warmup_range()
        warmup = {"low": low, "high": high}
        if (low, high) != WARMUP_STEPS:
            warmup["scaled_from"] = list(WARMUP_STEPS)
        return {
            "learning_rate": {"low": LEARNING_RATE[0], "high": LEARNING_RATE[1], "log": True},
            "optim": {"choices": list(OPTIMIZERS)},
            "warmup_steps": warmup,
            "weight_decay": {"low": WEIGHT_DECAY[0], "high": WEIGHT_DECAY[1], "log": False},
        }


def sampler(seed: int):
    """The seeded sampler every sweep uses: the same seed draws the same trials."""
    import optuna

    return optuna.samplers.TPESampler(seed=seed)


@dataclass
class SweepJob:
    arch: str
    trials: int
    dataset: str = SYNTHETIC
    output_dir: Path | None = None
    overwrite: bool = False
    settings: dict[str, str] = field(default_factory=dict)
    max_steps: int | None = None
    seed: int | None = None  # train.seed; None: the recipe's
    show_progress: bool = True


@dataclass
class TrialRecord:
    """One trial as ``trials.json`` holds it."""

    number: int
    state: str  # "complete" or "failed"
    hyperparameters: dict[str, Any]
    validation_loss: float | None
    validation_perplexity: float | None
    validation_curve: dict[int, float]  # step -> validation loss at every evaluation of the trial
    steps: int | None
    seconds: float
    optimizer: str | None  # the class that trained the trial, e.g. AdamW, Adafactor
    applied: dict[str, float]  # learning rate and weight decay as the optimizer got them; warm-up as the scheduler did
    alarms: list[dict[str, Any]]
    error: str | None = None


def plan_sweep(job: SweepJob) -> dict[str, Any]:
    """Validates the whole sweep before anything is built; returns ``runner.plan``'s parts for the
    shared recipe. Raises UsageError on bad input (optuna missing first)."""
    require_optuna()
    if job.trials < 1:
        raise UsageError(f"--trials {job.trials}: expected a positive integer")
    for key in job.settings:
        namespace, _, name = key.rpartition(".")
        if name in SEARCHED and namespace in ("", "train"):
            raise UsageError(
                f"--set {key}: the sweep searches {name} itself ({', '.join(SEARCHED)}); remove it from --set"
            )
    settings = dict(job.settings)
    if job.seed is not None:
        if any(k in settings for k in (SEED_KEY, "seed")):
            raise UsageError(f"--seed {job.seed}: given both by --seed and as {SEED_KEY} in --set")
        settings[SEED_KEY] = str(job.seed)
    job.output_dir = job.output_dir or default_output_dir(f"{job.arch}-sweep")
    # The sweep folder is validated as a train run's folder would be (it replaces DIR the same way).
    parts = plan(TrainJob(
        arch=job.arch, dataset=job.dataset, output_dir=job.output_dir, overwrite=job.overwrite,
        settings=settings, max_steps=job.max_steps,
    ))
    parts["settings"] = settings
    return parts


class _TrialLog(TrainerCallback):
    """What one trial did: the optimizer it trained with, its validation curve, its steps and alarms.

    Also makes a trial that stops early (``stop_on_alarm``) evaluate at the step it stops, so it is
    scored on the weights it ends with; the Trainer only evaluates at the last of ``max_steps``."""

    def __init__(self, monitor: CollapseMonitorCallback):
        self.monitor = monitor
        self.optimizer: str | None = None
        self.applied: dict[str, float] = {}
        self.curve: dict[int, float] = {}
        self.steps: int | None = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
        if inner is not None:
            self.optimizer = type(inner).__name__
            group = inner.param_groups[0]
            self.applied = {"learning_rate": group.get("initial_lr", group["lr"]),
                            "weight_decay": group["weight_decay"],
                            "warmup_steps": args.get_warmup_steps(state.max_steps)}
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_training_stop:
            control.should_evaluate = True
        return control

    on_log = on_step_end  # the monitor's stall alarm stops training from a log

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            self.curve[state.global_step] = metrics["eval_loss"]
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.steps = state.global_step
        return control


class _SweepTrainer(DecollapseTrainer):
    """The Trainer the search runs: every trial starts as a fresh ``decollapse train`` run would,
    with a fresh collator (a seeded masking collator's stream restarts: every trial sees the same
    masks), a fresh collapse monitor and step hook, and a ``_TrialLog``."""

    def __init__(self, *args, new_collator: Callable, new_monitor: Callable, on_trial_done=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._new_collator = new_collator
        self._new_monitor = new_monitor
        self.on_trial_done = on_trial_done
        self.trial_logs: dict[int, _TrialLog] = {}
        self.trial_errors: dict[int, str] = {}

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        if trial is None or not hasattr(self, "trial_logs"):
            return model  # Trainer.__init__'s model: no trial to run
        self.data_collator = self._new_collator()
        for kind in (CollapseMonitorCallback, _TrialLog, StepUpdateCallback):
            while self.pop_callback(kind) is not None:
                pass
        monitor = self._new_monitor()
        log = _TrialLog(monitor)
        # The trial log after the monitor: it sees a stop the monitor asked for in the same step.
        for callback in (monitor, log, StepUpdateCallback()):
            self.add_callback(callback)
        self.trial_logs[trial.number] = log
        return model

    def train(self, *args, trial=None, **kwargs):
        try:
            output = super().train(*args, trial=trial, **kwargs)
        except NonFiniteLossError as err:
            if trial is not None:
                self.trial_errors[trial.number] = str(err)
                self._report(trial, None)
            raise
        if trial is not None:
            self._report(trial, self.objective)
        return output

    def _report(self, trial, objective: float | None) -> None:
        if self.on_trial_done is not None:
            self.on_trial_done(trial.number, dict(trial.params), objective, self.trial_errors.get(trial.number))


def search(parts: dict[str, Any], dataset, tokenizer, trials: int, scratch: Path, show_progress: bool = True,
           on_trial_done=None) -> tuple[list[TrialRecord], int]:
    """Runs ``trials`` trials with ``Trainer.hyperparameter_search(backend="optuna")``, on the train
    split, scored on the validation split. Returns every trial and the number of the best one; raises
    AllTrialsFailed when none finished with a finite loss."""
    import optuna

    arch, recipe, objective = parts["arch"], parts["recipe"], parts["objective"]
    seq_len = len(dataset["train"][0]["input_ids"])
    train_rows = dataset["train"]

    def model_init():
        set_seed(recipe.seed)
        model = build_model(parts, tokenizer, seq_len, train_rows)
        # Seeded again after the initialisation, as the Trainer of `decollapse train` seeds after the
        # model is built: dropout and everything after it draw what the rerun of the best trial draws.
        set_seed(recipe.seed)
        return model

    probe = probe_batch(dataset["validation"], recipe.probe_size or arch.probe_size)
    first = model_init()
    keep = ["input_ids", *first.aux_label_columns]
    space = SearchSpace(recipe.max_steps)
    trainer = _SweepTrainer(
        model_init=model_init,
        args=training_arguments(recipe, scratch, arch),
        train_dataset=dataset["train"].select_columns(keep),
        # The test split is never handed to a trial: selection can only see validation.
        eval_dataset=dataset["validation"].select_columns(keep),
        data_collator=build_collator(objective, tokenizer, recipe),
        processing_class=tokenizer,
        # Gradients are still checked every step; the copy of the last good weights is for a run
        # that keeps a checkpoint, which a trial does not.
        callbacks=[NonFiniteGuardCallback(keep_last_good=False)],
        eval_data_collator=lambda: build_collator(objective, tokenizer, recipe),
        new_collator=lambda: build_collator(objective, tokenizer, recipe),
        new_monitor=lambda: CollapseMonitorCallback(
            probe, every_n_steps=recipe.monitor_every, stop_on_alarm=recipe.stop_on_alarm
        ),
        on_trial_done=on_trial_done,
    )
    if trainer.pop_callback(ProgressCallback) is not None and show_progress:
        trainer.add_callback(QuietProgressCallback)

    storage = optuna.storages.InMemoryStorage()
    verbosity = optuna.logging.get_verbosity()
    # One line per trial comes from the caller; optuna's own would repeat it (with a traceback for
    # a diverged trial, whose error the trial record keeps).
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        best = trainer.hyperparameter_search(
            hp_space=space,
            # The task loss on validation alone: the Trainer's default objective would add every other
            # metric (perplexity, auxiliary terms) to it.
            compute_objective=lambda metrics: metrics["eval_loss"],
            n_trials=trials,
            direction="minimize",
            backend="optuna",
            sampler=sampler(recipe.seed),
            pruner=optuna.pruners.NopPruner(),
            storage=storage,
            study_name="decollapse-sweep",
            catch=(NonFiniteLossError,),
        )
    except ValueError:  # optuna's best_trial, when no trial completed
        if len(trainer.trial_errors) == trials:
            first_error = trainer.trial_errors[min(trainer.trial_errors)]
            raise AllTrialsFailed(
                f"every one of the {trials} trials diverged (trial {min(trainer.trial_errors)}: {first_error})"
            ) from None
        raise
    finally:
        optuna.logging.set_verbosity(verbosity)
    study = optuna.load_study(study_name="decollapse-sweep", storage=storage)
    records = [_record(t, trainer, objective) for t in study.trials]
    return records, int(best.run_id)


def _record(trial, trainer: _SweepTrainer, objective: str) -> TrialRecord:
    import optuna

    log = trainer.trial_logs.get(trial.number)
    complete = trial.state == optuna.trial.TrialState.COMPLETE
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() if trial.datetime_complete else 0.0
    return TrialRecord(
        number=trial.number,
        state="complete" if complete else "failed",
        hyperparameters=dict(trial.params),
        validation_loss=trial.value if complete else None,
        # A perplexity only for a causal LM: exp of a masked or denoising loss is not one.
        validation_perplexity=_perplexity(trial.value) if complete and objective == "causal_lm" else None,
        validation_curve=dict(log.curve) if log else {},
        steps=log.steps if log else None,
        seconds=round(seconds, 1),
        optimizer=log.optimizer if log else None,
        applied=dict(log.applied) if log else {},
        alarms=[asdict(a) for a in log.monitor.alarms] if log else [],
        error=trainer.trial_errors.get(trial.number),
    )


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


def best_settings(settings: dict[str, str], hyperparameters: dict[str, Any]) -> dict[str, str]:
    """The ``--set`` of an ordinary ``decollapse train`` run with the given trial's hyper-parameters
    (``str`` of a float reads back as the same float)."""
    return {**settings, **{name: str(value) for name, value in hyperparameters.items()}}


def run_sweep(job: SweepJob, on_trial_done=None) -> dict[str, Any]:
    """Plans, searches, trains the best trial once more with the test split, and publishes DIR with
    ``trials.json``, ``report.md`` and ``best/``; returns the ``trials.json`` payload."""
    parts = plan_sweep(job)
    recipe = parts["recipe"]
    output_dir: Path = parts["output_dir"]
    train_job = TrainJob(arch=job.arch, dataset=job.dataset, settings=parts["settings"], max_steps=job.max_steps)
    set_seed(recipe.seed)
    dataset, tokenizer, corpus_summary = load_data(train_job, parts)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        search_data = {"train": dataset["train"], "validation": dataset["validation"]}
        records, best_number = search(
            parts, search_data, tokenizer, job.trials, work / "trainer", job.show_progress, on_trial_done
        )
        # report_to integrations (tensorboard) wrote every trial under the scratch folder: keep them.
        if (work / "trainer" / "runs").is_dir():
            (work / "trainer" / "runs").rename(work / "tensorboard")
        shutil.rmtree(work / "trainer", ignore_errors=True)
        best = next(r for r in records if r.number == best_number)
        settings = best_settings(parts["settings"], best.hyperparameters)
        best_job = TrainJob(
            arch=job.arch, dataset=job.dataset, output_dir=work / "best", overwrite=True, settings=settings,
            max_steps=job.max_steps, show_progress=job.show_progress,
        )
        summary = run(best_job, data=(dataset, tokenizer, corpus_summary))
        metrics = summary["metrics"]
        rerun_loss = metrics.get("validation_loss")
        reproduced = rerun_loss is not None and math.isclose(
            rerun_loss, best.validation_loss, rel_tol=RERUN_TOLERANCE
        )
        if not reproduced:
            logger.warning(
                "the rerun of trial %d gave validation loss %s, the trial %s",
                best.number, rerun_loss, best.validation_loss,
            )
        payload = {
            "architecture": parts["arch"].name,
            "objective": parts["objective"],
            "dataset": job.dataset,
            "command": rerun_command(job),
            "trials_requested": job.trials,
            "max_steps": recipe.max_steps,
            "seed": recipe.seed,
            "settings": parts["settings"],
            "selection": "validation loss (task loss on the validation split) at each trial's last step, minimised",
            "sampler": f"optuna TPESampler(seed={recipe.seed}), no pruning",
            "search_space": SearchSpace(recipe.max_steps).describe(),
            "trials": [asdict(r) for r in records],
            "best": {
                "trial": best.number,
                "hyperparameters": best.hyperparameters,
                "validation_loss": best.validation_loss,
                "run": "best",
                "train_command": train_command(job, settings),
                "rerun_validation_loss": rerun_loss,
                "rerun_reproduces_trial": reproduced,
                "test": {k: v for k, v in metrics.items()
                         if k.startswith("test_") and not k.endswith(("_runtime", "_per_second"))},
            },
        }
        (work / "trials.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
        (work / "report.md").write_text(to_markdown(payload) + "\n")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    publish(work, output_dir)
    return payload


def rerun_command(job: SweepJob) -> str:
    parts = ["decollapse sweep", job.arch, "--trials", str(job.trials)]
    if job.dataset != SYNTHETIC:
        parts += ["--dataset", job.dataset]
    if job.max_steps is not None:
        parts += ["--max-steps", str(job.max_steps)]
    if job.seed is not None:
        parts += ["--seed", str(job.seed)]
    if job.settings:
        parts += ["--set"] + [f"{k}={v}" for k, v in job.settings.items()]
    return " ".join(parts)


def train_command(job: SweepJob, settings: dict[str, str]) -> str:
    parts = ["decollapse train", job.arch]
    if job.dataset != SYNTHETIC:
        parts += ["--dataset", job.dataset]
    if job.max_steps is not None:
        parts += ["--max-steps", str(job.max_steps)]
    return " ".join(parts + ["--set"] + [f"{k}={v}" for k, v in settings.items()])


def _number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def to_markdown(payload: dict[str, Any]) -> str:
    """The trial table, the best trial, and its rerun's test perplexity (the only test number)."""
    best = payload["best"]
    lines = [
        f"Sweep of `{payload['architecture']}`, {len(payload['trials'])} trials of {payload['max_steps']} steps, "
        f"selected on validation loss: `{payload['command']}`",
        "",
        "| trial | learning_rate | optim | warmup_steps | weight_decay | val loss | val ppl | steps | alarms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for trial in payload["trials"]:
        hp = trial["hyperparameters"]
        number = f"**{trial['number']}** (best)" if trial["number"] == best["trial"] else str(trial["number"])
        loss = _number(trial["validation_loss"]) if trial["state"] == "complete" else "diverged"
        lines.append(
            f"| {number} | {hp['learning_rate']:.3g} | {hp['optim']} | {hp['warmup_steps']} | "
            f"{hp['weight_decay']:.3f} | {loss} | {_number(trial['validation_perplexity'], 3)} | "
            f"{trial['steps'] if trial['steps'] is not None else 'n/a'} | {len(trial['alarms'])} |"
        )
    failed = [t for t in payload["trials"] if t["state"] != "complete"]
    for trial in failed:
        lines += ["", f"Trial {trial['number']} diverged: {trial['error']}."]
    test = best["test"]
    rerun = (
        f"Its rerun (`{best['run']}/`, an ordinary `decollapse train` run) gave validation loss "
        f"{_number(best['rerun_validation_loss'])}"
        + ("" if best["rerun_reproduces_trial"] else " (**not** the trial's: see the warning above)")
    )
    test_line = f"test perplexity {_number(test.get('test_perplexity'), 3)}"
    if "test_optimal_perplexity" in test:
        test_line += (
            f" (Bayes-optimal {_number(test['test_optimal_perplexity'], 3)}, "
            f"ratio {_number(test['test_perplexity_ratio'], 3)})"
        )
    if payload["objective"] != "causal_lm":
        test_line = f"test {payload['objective']} loss {_number(test.get('test_loss'))}"
    lines += [
        "",
        f"Best: trial {best['trial']}, validation loss {_number(best['validation_loss'])}. "
        f"{rerun}; evaluated once on the test split: {test_line}.",
        "",
        f"Train it again: `{best['train_command']}`",
    ]
    return "\n".join(lines)
