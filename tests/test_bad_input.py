"""Bad input to `decollapse train / diagnose / export`: one line naming the problem, exit code 2,
nothing written, and for `train` nothing built (the checks run in `runner.plan`, before the data)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import decollapse.runner as runner
from decollapse.cli import main
from decollapse.data import SyntheticCorpusConfig, build_synthetic_corpus
from decollapse.registry import ARCHITECTURES
from decollapse.runner import TrainJob, plan
from decollapse.trainers import NonFiniteGuardCallback

from .conftest import tiny_model

TINY_CORPUS = ["corpus.num_train=64", "corpus.num_validation=16", "corpus.num_test=16", "corpus.seq_len=32"]


def _one_line_exit_2(capsys, argv, message):
    capsys.readouterr()  # what a fixture printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("decollapse: error:"), err
    assert message in err, err
    return err


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def no_data(monkeypatch):
    """Building the data is the first work `run` does after `plan`: any call fails the test."""

    def built(*args, **kwargs):
        raise AssertionError("the data was built before the bad input was refused")

    monkeypatch.setattr(runner, "load_data", built)


@pytest.mark.parametrize(
    "settings, message",
    [
        (["learning_rate=-1"], "learning_rate=-1.0: expected a finite number >= 0"),
        (["learning_rate=nan"], "learning_rate=nan"),
        (["weight_decay=-0.1"], "weight_decay=-0.1"),
        (["warmup_steps=-3"], "warmup_steps=-3: expected an integer >= 0"),
        (["aux_warmup_steps=-1"], "aux_warmup_steps=-1"),
        (["max_grad_norm=0"], "max_grad_norm=0.0: expected a number > 0"),
        (["logging_steps=0"], "logging_steps=0: expected a positive integer"),
        (["eval_steps=0"], "eval_steps=0: expected a positive integer"),
        (["monitor_every=0"], "monitor_every=0"),
        (["probe_size=0"], "probe_size=0"),
        (["eval_batch_size=0"], "eval_batch_size=0"),
        (["mlm_probability=1.5"], "mlm_probability=1.5"),
        (["train.seed=-1"], "seed=-1"),
        (["lr_scheduler=foo"], "lr_scheduler=foo: expected one of linear, cosine"),
        # A scheduler transformers has, but which needs lr_scheduler_kwargs the recipe never sets.
        (["lr_scheduler=cosine_with_min_lr"], "lr_scheduler=cosine_with_min_lr: expected one of"),
        (["report_to=foo"], "'foo' is not a transformers integration"),
        (["loss_weighting=foo"], "loss_weighting='foo'"),
        (['aux_weights={"nope": 1}'], "unknown term(s) nope; this model reports: head_similarity"),
        (['aux_weights={"head_similarity": -1}'], "finite and >= 0"),
        (["max_position_embeddings=16"],
         "max_position_embeddings=16: the training sequences are 32 tokens (corpus.seq_len)"),
    ],
)
def test_bad_training_knobs_are_refused_before_any_work(tmp_path, capsys, no_data, settings, message):
    out = tmp_path / "out"
    argv = ["train", "dense", "--max-steps", "3", "--output-dir", str(out), "--set", *TINY_CORPUS, *settings]
    _one_line_exit_2(capsys, argv, message)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_report_to_an_integration_that_is_not_installed_is_refused(tmp_path, capsys, no_data, monkeypatch):
    """Judged the way transformers judges it (``is_wandb_available``), whatever this machine has."""
    from transformers.integrations import integration_utils

    monkeypatch.setattr(integration_utils, "is_wandb_available", lambda: False)
    out = tmp_path / "out"
    argv = ["train", "dense", "--output-dir", str(out), "--set", "report_to=wandb"]
    _one_line_exit_2(capsys, argv, "wandb is not usable here (transformers' is_wandb_available() is False")
    assert not out.exists()


def test_max_position_embeddings_below_the_text_block_size_is_refused(tmp_path, capsys, no_data):
    text = tmp_path / "corpus.txt"
    text.write_text("some words\n" * 50)
    argv = ["train", "dense", "--dataset", str(text), "--output-dir", str(tmp_path / "out"),
            "--set", "block_size=64", "max_position_embeddings=32"]
    _one_line_exit_2(capsys, argv, "max_position_embeddings=32: the training sequences are 64 tokens (block_size)")


def test_an_output_dir_under_a_file_is_refused_before_any_work(tmp_path, capsys, no_data):
    # Tests run as root, where permission bits stop nothing: a file as the parent stops everyone.
    (tmp_path / "a-file").write_text("not a folder")
    out = tmp_path / "a-file" / "run"
    _one_line_exit_2(capsys, ["train", "dense", "--output-dir", str(out)], f"--output-dir {out}: ")
    assert (tmp_path / "a-file").read_text() == "not a folder" and _leftovers(tmp_path) == []


def test_an_output_dir_where_no_folder_can_be_created_is_refused_before_any_work(tmp_path, capsys, no_data):
    out = Path("/proc") / f"decollapse-{tmp_path.name}" / "run"  # /proc exists and takes no new folders
    _one_line_exit_2(capsys, ["train", "dense", "--output-dir", str(out)], "cannot create folders in /proc")
    assert not out.parent.exists()


# -- logging a short run ----------------------------------------------------------------------------


def test_a_short_run_logs_its_training_loss_often_enough_to_draw_a_curve(tmp_path):
    """At the default 50-step logging, a run shorter than 50 steps logs no training loss at all."""

    def logging_steps(max_steps, **settings):
        job = TrainJob("dense", output_dir=tmp_path / "o", max_steps=max_steps, settings=settings)
        return plan(job)["recipe"].logging_steps

    assert logging_steps(5000) == 50, "the default recipe is untouched"
    assert logging_steps(200) == 20
    assert logging_steps(3) == 1
    assert logging_steps(20, logging_steps="5") == 5, "an explicit value that logs is kept"
    assert logging_steps(20, logging_steps="50") == 2, "an explicit value that would log nothing is lowered"


# -- corrupt checkpoints ----------------------------------------------------------------------------


def _damage(path, how):
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"\x13\x37" * 500)
    else:
        path.write_bytes(b"")


@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    tiny_model("dense").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
@pytest.mark.parametrize("command", ["diagnose", "export"])
def test_a_corrupt_weights_file_is_named_in_one_line(tmp_path, capsys, checkpoint, command, how):
    _damage(checkpoint / "model.safetensors", how)
    argv = [command, str(checkpoint)] + ([str(tmp_path / "exported")] if command == "export" else [])
    err = _one_line_exit_2(capsys, argv, "model.safetensors: truncated or corrupt")
    assert str(checkpoint.name) in err
    assert not (tmp_path / "exported").exists() and _leftovers(tmp_path) == []
    assert not (checkpoint / "plots").exists()


def test_diagnose_names_a_corrupt_probe_batch(tmp_path, capsys, checkpoint):
    probe = checkpoint / "probe_batch.safetensors"
    save_file({"input_ids": torch.randint(3, 61, (2, 8))}, str(probe))
    _damage(probe, "truncated")
    _one_line_exit_2(capsys, ["diagnose", str(checkpoint)], "probe_batch.safetensors: truncated or corrupt")


def test_diagnose_refuses_weights_that_lack_tensors_rather_than_reporting_on_fresh_ones(capsys, checkpoint):
    weights = load_file(str(checkpoint / "model.safetensors"))
    dropped = sorted(weights)[0]
    del weights[dropped]
    save_file(weights, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    _one_line_exit_2(capsys, ["diagnose", str(checkpoint)], "weights missing for")


# -- the non-finite guard's last good state ---------------------------------------------------------


class _State:
    def __init__(self, step):
        self.global_step = step


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_the_guard_restores_the_state_from_before_the_update_buffers_included(arch):
    model = tiny_model(arch)
    guard = NonFiniteGuardCallback()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    guard.on_pre_optimizer_step(None, _State(7), None, model=model)
    with torch.no_grad():  # the update that led to the non-finite loss, and buffers moving on
        for value in model.state_dict().values():
            value.add_(1) if value.is_floating_point() else value.fill_(123)
    assert guard.restore_last_good(model) == 7
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.fixture(scope="module")
def corpus_tokenizer():
    return build_synthetic_corpus(SyntheticCorpusConfig(num_train=8, num_validation=4, num_test=4, seq_len=16)).tokenizer


HEADS = [(a, o) for a in ARCHITECTURES for o in ARCHITECTURES[a].objectives]


@pytest.mark.parametrize("arch, objective", HEADS)
def test_the_probe_forward_check_passes_a_sound_model_and_fails_one_that_overflows(corpus_tokenizer, arch, objective):
    """Finite weights can still overflow; the check runs every head, including those needing labels."""
    model = tiny_model(arch, objective, vocab_size=len(corpus_tokenizer))  # masking draws random tokens
    collator = runner.build_collator(objective, corpus_tokenizer, runner.TrainRecipe())
    probe = {"input_ids": torch.randint(7, 61, (2, 16), generator=torch.Generator().manual_seed(0))}
    assert runner._forward_is_finite(model, probe, collator)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1e38)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not runner._forward_is_finite(model, probe, collator)


def test_a_last_good_state_whose_forward_is_not_finite_is_not_kept(tmp_path, corpus_tokenizer):
    model = tiny_model("dense")
    guard = NonFiniteGuardCallback()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1e38)
    guard.on_pre_optimizer_step(None, _State(4), None, model=model)
    probe = {"input_ids": torch.randint(7, 61, (2, 16))}
    collator = runner.build_collator("causal_lm", corpus_tokenizer, runner.TrainRecipe())
    kept, note = runner._keep_last_good(model, corpus_tokenizer, guard, probe, collator, tmp_path / "out", False)
    assert kept is None and "weights of step 4" in note and "non-finite outputs on the probe batch" in note
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_no_finite_step_keeps_nothing_and_says_so(tmp_path, capsys, monkeypatch):
    from decollapse.trainers import DecollapseTrainer, NonFiniteLossError

    def always_non_finite(task_loss, aux_losses, total, step):
        raise NonFiniteLossError("task_loss", step, float("nan"))

    monkeypatch.setattr(DecollapseTrainer, "_check_finite", staticmethod(always_non_finite))
    out = tmp_path / "run"
    argv = ["train", "dense", "--max-steps", "3", "--no-progress", "--output-dir", str(out), "--set", *TINY_CORPUS,
            "hidden_size=32", "num_hidden_layers=1", "num_attention_heads=4"]
    _one_line_exit_2(capsys, argv, "at step 0; training stopped, nothing kept: no step had a finite loss")
    assert not out.exists() and _leftovers(tmp_path) == []


def test_plan_leaves_no_trace_in_the_output_folder_parent(tmp_path):
    plan(TrainJob("dense", output_dir=tmp_path / "deep" / "run"))
    assert list(tmp_path.iterdir()) == []
