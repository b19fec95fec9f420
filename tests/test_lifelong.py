"""`decollapse lifelong`: phase 1 on one domain subset, phase 2 on another from phase 1's weights, and
the forgetting on the first subset; bad input is one line, exit code 2, nothing written."""

import json

import pytest
import torch
from safetensors.torch import load_file

from decollapse.cli import main
from decollapse.data import SyntheticCorpusConfig, build_synthetic_corpus
from decollapse.lifelong import causal_architectures
from decollapse.registry import ARCHITECTURES
from decollapse.runner import TrainJob, UsageError, evaluate_checkpoint, plan, run

from .test_cli import TINY_CORPUS, _leftovers

# One layer: each run's report draws a heatmap per layer and unit group, most of a tiny run's time.
DENSE_TINY = ["hidden_size=32", "num_hidden_layers=1", "num_attention_heads=4"]
CORPUS_KNOBS = dict(num_train=64, num_validation=16, num_test=16, seq_len=32)


def _lifelong(tmp_path, arch, *settings, first="0-3", then="4-7", steps=4, extra=(), name="ll"):
    out = tmp_path / name
    argv = ["lifelong", arch, "--first", first, "--then", then, "--max-steps", str(steps), "--no-progress",
            "--output-dir", str(out), *extra, "--set", *TINY_CORPUS, *settings]
    return main(argv), out


def _tiny_settings(arch: str) -> list[str]:
    spec = ARCHITECTURES[arch]
    tiny = {k: v for k, v in spec.tiny.items() if k != "aux_head_classes"}  # lifelong sizes them
    shown = {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in tiny.items()}
    return ["hidden_size=32", "num_hidden_layers=1", *(f"{k}={v}" for k, v in shown.items())]


def test_lifelong_reports_forgetting_on_the_first_subset(tmp_path, capsys):
    code, out = _lifelong(tmp_path, "dense", *DENSE_TINY, steps=6, extra=["--seeds", "0,1"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "[seed 1] phase2 (domains 4-7)" in printed and "| seed | ppl 0-3 before |" in printed
    payload = json.loads((out / "lifelong.json").read_text())
    assert payload["first_domains"] == [0, 1, 2, 3] and payload["then_domains"] == [4, 5, 6, 7]
    assert [row["seed"] for row in payload["rows"]] == [0, 1]

    first_corpus = build_synthetic_corpus(SyntheticCorpusConfig(domains="0-3", **CORPUS_KNOBS))
    for row in payload["rows"]:
        phase1, phase2 = out / row["phase1"], out / row["phase2"]
        assert json.loads((phase1 / "corpus.json").read_text())["domains"] == [0, 1, 2, 3]
        assert json.loads((phase2 / "corpus.json").read_text())["domains"] == [4, 5, 6, 7]
        before = json.loads((phase1 / "metrics.json").read_text())
        then = json.loads((phase2 / "metrics.json").read_text())
        assert before["steps"] == then["steps"] == 6
        assert then["init_checkpoint"] == "../phase1" and before["init_checkpoint"] is None
        for split in ("test", "validation"):
            cell = row[split]
            assert cell["first_before"] == before["metrics"][f"{split}_perplexity"]
            assert cell["then_after"] == then["metrics"][f"{split}_perplexity"]
            assert cell["forgetting"] == pytest.approx(cell["first_after"] - cell["first_before"])
            assert cell["ratio"] == pytest.approx(cell["first_after"] / cell["first_before"])
            assert cell["first_optimal"] == pytest.approx(first_corpus.bounds[split]["perplexity"])
        # "After" is the phase-2 checkpoint on the first subset, measured as phase 1 measured "before":
        # the same evaluation on phase 1's checkpoint gives back phase 1's own numbers.
        parts = plan(TrainJob(arch="dense", output_dir=tmp_path / "unused", settings=dict(
            s.split("=", 1) for s in [*DENSE_TINY, *TINY_CORPUS, f"train.seed={row['seed']}"])))
        args = (first_corpus.dataset, first_corpus.tokenizer, first_corpus.summary())
        again = evaluate_checkpoint(parts, phase1, *args, show_progress=False)
        after = evaluate_checkpoint(parts, phase2, *args, show_progress=False)
        assert again["test_perplexity"] == pytest.approx(row["test"]["first_before"], rel=1e-5)
        assert after["test_perplexity"] == pytest.approx(row["test"]["first_after"], rel=1e-5)
    forgetting = [row["test"]["forgetting"] for row in payload["rows"]]
    assert payload["summary"]["test"]["forgetting"]["mean"] == pytest.approx(sum(forgetting) / 2)
    report = (out / "report.md").read_text()
    assert "| mean ± std |" in report and "fresh optimizer and learning-rate schedule" in report
    assert payload["command"].startswith("decollapse lifelong dense --first 0-3 --then 4-7 --max-steps 6 --seeds 0,1")
    assert _leftovers(tmp_path) == []


def test_a_continued_run_starts_from_the_checkpoint_weights(tmp_path):
    """Phase 2 trains phase 1's model, not a fresh one: at learning rate 0 its weights stay phase 1's."""
    settings = dict(s.split("=", 1) for s in [*DENSE_TINY, *TINY_CORPUS])
    first = TrainJob(arch="dense", output_dir=tmp_path / "first", max_steps=3, show_progress=False,
                     settings={**settings, "corpus.domains": "0-3"})
    run(first)
    second = TrainJob(arch="dense", output_dir=tmp_path / "second", max_steps=2, show_progress=False,
                      settings={**settings, "corpus.domains": "4-7", "train.learning_rate": "0"},
                      init_checkpoint=tmp_path / "first")
    run(second)
    trained, continued = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("first", "second"))
    assert trained.keys() == continued.keys()
    assert all(torch.equal(trained[k], continued[k]) for k in trained)

    wider = TrainJob(arch="dense", output_dir=tmp_path / "third", max_steps=2,
                     settings={**settings, "hidden_size": "64"}, init_checkpoint=tmp_path / "first")
    with pytest.raises(UsageError, match="hidden_size=64: the checkpoint .* has hidden_size=32"):
        run(wider)
    assert not (tmp_path / "third").exists()


@pytest.mark.parametrize("arch", [a for a in causal_architectures() if a != "dense"])  # dense: the test above
def test_lifelong_runs_for_every_causal_architecture(tmp_path, arch):
    settings = _tiny_settings(arch)
    if arch == "sosm":  # heads on label columns: phase 2's domains and senses must fit phase 1's heads
        settings.append("aux_head_weight=0.1")
    code, out = _lifelong(tmp_path, arch, *settings, steps=2)
    assert code == 0
    row = json.loads((out / "lifelong.json").read_text())["rows"][0]
    assert row["test"]["first_after"] > 1.0 and (out / row["phase2"] / "model.safetensors").is_file()
    if arch == "sosm":
        config = json.loads((out / row["phase2"] / "config.json").read_text())
        assert config["aux_head_classes"] == SyntheticCorpusConfig(**CORPUS_KNOBS).label_classes


@pytest.mark.parametrize(
    "arch, args, message",
    [
        ("concept", [], "concept has no causal_lm head"),
        ("dense", ["--set", "objective=masked_lm"], "expected objective=causal_lm"),
        ("dense", ["--first", "0-9"], "--first '0-9': expected domain indices in 0-7 (num_domains=8)"),
        ("dense", ["--then", "3-1"], "--then '3-1': expected domain indices in 0-7"),
        ("dense", ["--first", "a"], "'a' is not an index or a range"),
        ("dense", ["--set", "corpus.num_domains=4", "--then", "4-7"], "0-3 (num_domains=4)"),
        ("dense", ["--set", "corpus.domains=0-3"], "the domains of each phase are --first and --then"),
        ("dense", ["--seeds", "0,1", "--set", "train.seed=3"], "given both by --seeds"),
        ("dense", ["--seeds", "0,x"], "--seeds"),
        ("dense", ["--set", "hidden_size=30", "num_attention_heads=4"], "hidden_size=30"),
        ("sosm", ["--set", "aux_head_weight=0.1", 'aux_head_classes={"domain": 4}'], "'domain' has 4 classes"),
    ],
)
def test_bad_lifelong_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, arch, args, message):
    argv = ["lifelong", arch, "--first", "0-3", "--then", "4-7", "--max-steps", "1",
            "--output-dir", str(tmp_path / "out")]
    for flag in ("--first", "--then"):  # a flag given in args replaces the default one
        if flag in args:
            at = argv.index(flag)
            del argv[at : at + 2]
    assert main(argv + args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("decollapse: error:") and message in err, err
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_a_subset_out_of_range_is_refused_by_train_too(tmp_path, capsys):
    assert main(["train", "dense", "--output-dir", str(tmp_path / "out"), "--set", "corpus.domains=0-9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SyntheticCorpusConfig.domains='0-9' is not allowed" in err
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
