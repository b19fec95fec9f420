"""Runs that survive interruption: SIGINT / SIGTERM stop at a step boundary with a checkpoint,
``decollapse train ARCH --resume DIR`` continues exactly where the run stopped, periodic checkpoints."""

from __future__ import annotations

import json
import os
import signal

import pytest

from decollapse.cli import main
from decollapse.registry import ARCHITECTURES
from decollapse.trainers import DecollapseTrainer

TINY_RUN = ["corpus.num_train=48", "corpus.num_validation=8", "corpus.num_test=8", "corpus.seq_len=24",
            "eval_steps=100", "logging_steps=1", "monitor_every=100"]


@pytest.fixture
def signal_at(monkeypatch):
    """``signal_at(step, sig)``: the training process receives ``sig`` during optimizer step ``step``
    (as a scheduler's SIGTERM or a Ctrl-C would arrive, in the middle of a step)."""
    plan = {}
    original = DecollapseTrainer.training_step

    def training_step(self, *args, **kwargs):
        if plan and self.state.global_step == plan["step"]:
            sig = plan.pop("signal")
            plan.clear()  # once: the runs after this one are not interrupted
            os.kill(os.getpid(), sig)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DecollapseTrainer, "training_step", training_step)

    def arm(step: int, sig=signal.SIGTERM):
        plan.update(step=step, signal=sig)

    return arm


def _train(arch, out, *extra, steps=8):
    return main(["train", arch, "--max-steps", str(steps), "--output-dir", str(out), "--no-progress",
                 "--set", *TINY_RUN, *extra])


TIMINGS = ("_runtime", "_per_second")


def _train_log(folder):
    """The logged training values, without the Trainer's timings (tokens per second, runtime)."""
    return [{k: v for k, v in e.items() if not k.endswith(TIMINGS)}
            for e in json.loads((folder / "training_log.json").read_text()) if "loss" in e]
CASES = [(arch, "loss_weighting=fixed") for arch in ARCHITECTURES] + [("dawn", "loss_weighting=kendall_gal")]


@pytest.mark.parametrize("arch, weighting", CASES, ids=[f"{a}-{w.split('=')[1]}" for a, w in CASES])
def test_a_stopped_run_resumes_to_the_uninterrupted_runs_numbers_exactly(tmp_path, signal_at, capsys, arch, weighting):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert _train(arch, straight, weighting) == 0
    signal_at(3)
    assert _train(arch, stopped, weighting) == 128 + signal.SIGTERM
    assert not stopped.exists()
    assert main(["train", arch, "--resume", str(stopped), "--no-progress"]) == 0
    # Every logged value of every step: losses, each auxiliary term and weight (Kendall-Gal's learned
    # ones included), gradient norm, learning rate. State buffers (SoME's keys, bias and usage, MoH's
    # counters) show up in the losses after the resume.
    assert _train_log(stopped) == _train_log(straight)
    metrics = {f: json.loads((f / "metrics.json").read_text()) for f in (straight, stopped)}
    scores = {f: {k: v for k, v in m["metrics"].items() if not k.endswith(TIMINGS)} for f, m in metrics.items()}
    assert scores[stopped] == scores[straight] and "validation_loss" in scores[straight]
    assert metrics[stopped]["resumed_from"] == "../stopped.checkpoints/checkpoint-4"
    assert not (tmp_path / "stopped.checkpoints").exists()  # a finished run keeps no resume point


def test_sigterm_leaves_a_checkpoint_and_one_line_saying_how_to_resume(tmp_path, signal_at, capsys):
    out = tmp_path / "run"
    signal_at(2)
    assert _train("dense", out) == 143
    err = capsys.readouterr().err
    line = f"decollapse: stopped by SIGTERM after step 3; checkpoint in {tmp_path}/run.checkpoints/checkpoint-3; " \
           f"continue with: decollapse train dense --resume {out}"
    assert line in err and err.strip().splitlines()[-1] == line
    # Nothing half-written: no output folder, no hidden partial folder; only the resumable checkpoint.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.checkpoints"]
    assert sorted(p.name for p in (tmp_path / "run.checkpoints").iterdir()) == ["checkpoint-3", "job.json"]
    assert (tmp_path / "run.checkpoints" / "checkpoint-3" / "optimizer.pt").is_file()


def test_ctrl_c_stops_at_the_step_boundary_too(tmp_path, signal_at):
    signal_at(1, signal.SIGINT)
    assert _train("dense", tmp_path / "run") == 128 + signal.SIGINT
    assert (tmp_path / "run.checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()


def test_periodic_checkpoints_keep_the_last_k_and_outlive_the_run(tmp_path):
    assert _train("dense", tmp_path / "run", "save_steps=2", "save_total_limit=2", steps=7) == 0
    kept = sorted(p.name for p in (tmp_path / "run.checkpoints").iterdir())
    assert kept == ["checkpoint-6", "checkpoint-7", "job.json"]  # every 2 steps and the last; 2 kept
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_a_new_run_does_not_mix_with_an_earlier_runs_checkpoints(tmp_path, signal_at, capsys):
    signal_at(1)
    assert _train("dense", tmp_path / "run") == 143
    capsys.readouterr()
    assert _train("dense", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run.checkpoints holds checkpoints of an earlier run" in err
    assert "--resume" in err and "--overwrite" in err
    assert _train("dense", tmp_path / "run", "--overwrite", steps=4) == 0
    assert not (tmp_path / "run.checkpoints").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "dense", "--resume", "{tmp}/nothing"], "--resume {tmp}/nothing: not a resumable run"),
        (["train", "dense", "--resume", "{tmp}/run", "--set", "learning_rate=1"],
         "--resume continues a run with the settings it was started with; drop --set"),
        (["train", "dense", "--resume", "{tmp}/run", "--max-steps", "9"], "drop --max-steps"),
        (["train", "moh", "--resume", "{tmp}/run"], "--resume {tmp}/run: that run trains dense, not moh"),
        (["train", "dense", "--set", "save_steps=-1", "--output-dir", "{tmp}/other"], "--set save_steps=-1: expected"),
    ],
)
def test_bad_resume_input_is_one_line_and_writes_nothing(tmp_path, signal_at, capsys, argv, message):
    signal_at(1)
    assert _train("dense", tmp_path / "run") == 143
    capsys.readouterr()
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(tmp=tmp_path) in err, err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_an_ordinary_run_puts_nothing_visible_beside_its_output_while_it_trains(tmp_path, monkeypatch):
    seen = []
    original = DecollapseTrainer.training_step

    def training_step(self, *args, **kwargs):
        seen.append(sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DecollapseTrainer, "training_step", training_step)
    assert _train("dense", tmp_path / "run", steps=3) == 0
    assert seen == [[], [], []]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_streamed_packed_text_run_resumes_exactly_too(tmp_path, signal_at):
    """A stream has no index to restart from: the Trainer replays it to the checkpoint's position, and
    the packed rows (position ids) and shuffle buffer must come out the same."""
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n".join(f"line {i} says {' '.join(str(j) for j in range(i % 13 + 2))}" for i in range(400)))
    text = ["--dataset", str(corpus), "--streaming", "--set", "block_size=32", "eval_steps=100", "logging_steps=1",
            "monitor_every=100", "streaming_held_out_rows=4", "hidden_size=32"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run = ["train", "dense", "--max-steps", "8", "--no-progress", *text]
    assert main([*run, "--output-dir", str(straight)]) == 0
    signal_at(3)
    assert main([*run, "--output-dir", str(stopped)]) == 128 + signal.SIGTERM
    assert main(["train", "dense", "--resume", str(stopped), "--no-progress"]) == 0
    assert _train_log(stopped) == _train_log(straight)
    metrics = [json.loads((f / "metrics.json").read_text()) for f in (straight, stopped)]
    assert metrics[0]["streaming"] and metrics[1]["recipe"]["packing"] == "documents"
    assert metrics[1]["metrics"]["validation_loss"] == metrics[0]["metrics"]["validation_loss"]
