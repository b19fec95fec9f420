"""`decollapse ablate`: a grid of real (tiny) training runs and one table, or nothing at all."""

import json

from decollapse.cli import main

from .test_cli import TINY_CORPUS, _leftovers

DAWN_TINY = ["hidden_size=32", "num_neurons=32", "neuron_top_k=4", "num_basis=8"]


def test_ablate_trains_every_combination_and_tabulates_them(tmp_path, capsys):
    out = tmp_path / "abl"
    code = main([
        "ablate", "dawn", "--max-steps", "6", "--output-dir", str(out),
        "--grid", "neuron_init=qr,uniform", "diversity_weight=0,0.1",
        "--set", *TINY_CORPUS, *DAWN_TINY,
    ])
    assert code == 0
    payload = json.loads((out / "ablation.json").read_text())
    combos = [(r["settings"]["neuron_init"], r["settings"]["diversity_weight"]) for r in payload["rows"]]
    assert combos == [("qr", "0"), ("qr", "0.1"), ("uniform", "0"), ("uniform", "0.1")]
    for row in payload["rows"]:
        assert (out / row["run"] / "model.safetensors").is_file()
        assert row["metrics"]["validation_perplexity"] > 1
    by_init = {r["settings"]["neuron_init"]: r["headline"]["coef similar pairs > 0.8 (max)"] for r in payload["rows"]}
    assert by_init["uniform"] > 0.9 and by_init["qr"] < 0.1, "the table shows the collapsed start"
    table = (out / "ablation.md").read_text()
    assert "| neuron_init | diversity_weight | val ppl |" in table
    assert "decollapse ablate dawn --max-steps 6 --grid neuron_init=qr,uniform diversity_weight=0,0.1" in table
    assert "[4/4]" in capsys.readouterr().out
    assert _leftovers(tmp_path) == []


def test_ablate_validates_every_run_before_training(tmp_path, capsys):
    out = tmp_path / "abl"
    # The second value of the grid is invalid: nothing may be trained or written.
    code = main(["ablate", "dawn", "--max-steps", "6", "--output-dir", str(out),
                 "--grid", "neuron_init=qr,orthogonal", "--set", *TINY_CORPUS])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neuron_init" in err[0]
    assert not out.exists() and _leftovers(tmp_path) == []


def test_ablate_refuses_a_malformed_grid(tmp_path, capsys):
    code = main(["ablate", "dawn", "--output-dir", str(tmp_path / "a"), "--grid", "neuron_init"])
    assert code == 2
    assert "expected key=value1,value2" in capsys.readouterr().err


MOH_TINY = ["hidden_size=32", "num_attention_heads=4", "num_key_value_heads=2", "head_dim=8"]


def test_ablate_cases_run_variants_whose_knobs_belong_together(tmp_path, capsys):
    out = tmp_path / "abl"
    code = main([
        "ablate", "moh", "--max-steps", "4", "--output-dir", str(out),
        "--case", "routing=all", "--case", "routing=adaptive routing_grad=none",
        "--set", *TINY_CORPUS, *MOH_TINY,
    ])
    assert code == 0
    payload = json.loads((out / "ablation.json").read_text())
    assert [r["settings"] for r in payload["rows"]] == [
        {"routing": "all"}, {"routing": "adaptive", "routing_grad": "none"}
    ]
    by_routing = {r["settings"]["routing"]: r["headline"] for r in payload["rows"]}
    assert by_routing["all"]["active heads / token (mean)"] == 4
    assert by_routing["adaptive"]["predictor LM grad (min layer)"] == 0.0, "none never reaches a predictor"
    table = (out / "ablation.md").read_text()
    assert "| routing | routing_grad | val ppl |" in table
    assert "| all | – |" in table
    assert "--case routing=all --case 'routing=adaptive routing_grad=none'" in table
    assert _leftovers(tmp_path) == []


def test_ablate_refuses_a_case_that_clashes_with_the_grid(tmp_path, capsys):
    code = main(["ablate", "moh", "--output-dir", str(tmp_path / "a"), "--case", "routing=all",
                 "--grid", "routing=topk,topp", "--set", *TINY_CORPUS])
    assert code == 2
    assert "routing: given both in --case and --grid" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    code = main(["ablate", "moh", "--output-dir", str(tmp_path / "a"), "--case", "routing"])
    assert code == 2 and "expected key=value" in capsys.readouterr().err


# --- seeds and a paired control -------------------------------------------------------------------

import dataclasses  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402

from decollapse.ablation import parse_control, parse_seeds, summarise, to_markdown  # noqa: E402
from decollapse.runner import UsageError  # noqa: E402


def _row(settings, seed, ppl, cos=0.5):
    return {
        "settings": settings, "seed": seed, "run": f"runs/{settings}__seed={seed}",
        "metrics": {"validation_perplexity": ppl, "validation_perplexity_ratio": ppl / 50},
        "headline": {"head |cos|": cos},
    }


CONTROL, BETTER, MIXED = {"arm": "control"}, {"arm": "better"}, {"arm": "mixed"}
HAND_ROWS = [
    _row(CONTROL, 0, 100.0, cos=0.2), _row(CONTROL, 1, 110.0, cos=0.4), _row(CONTROL, 2, 90.0, cos=0.6),
    # Listed out of seed order: a ratio must pair each seed with the control's run of the same seed.
    _row(BETTER, 2, 81.0), _row(BETTER, 0, 95.0), _row(BETTER, 1, 99.0),
    _row(MIXED, 0, 98.0), _row(MIXED, 1, 121.0), _row(MIXED, 2, 90.0),
]


def test_summary_is_mean_and_sample_std_and_ratios_pair_seeds():
    arms = {s.settings["arm"]: s for s in summarise(HAND_ROWS, CONTROL)}
    control = arms["control"]
    assert control.seeds == [0, 1, 2] and control.is_control
    assert control.validation_perplexity.mean == pytest.approx(100.0)
    assert control.validation_perplexity.std == pytest.approx(10.0), "sample std (n - 1), not population"
    assert control.headline["head |cos|"].mean == pytest.approx(0.4)
    assert control.headline["head |cos|"].std == pytest.approx(0.2)
    assert control.ratio_to_control.values == [1.0, 1.0, 1.0] and control.same_sign_every_seed is None

    better = arms["better"]
    assert better.seeds == [2, 0, 1]
    assert better.ratio_to_control.values == pytest.approx([0.9, 0.95, 0.9]), "81/90, 95/100, 99/110"
    assert better.ratio_to_control.mean == pytest.approx(2.75 / 3)
    assert better.ratio_to_control.std == pytest.approx(math.sqrt(0.05**2 / 3))
    assert better.same_sign_every_seed is True

    mixed = arms["mixed"]  # better on seed 0, worse on seed 1, no effect on seed 2: worse on average
    assert mixed.ratio_to_control.values == pytest.approx([0.98, 1.1, 1.0])
    assert mixed.ratio_to_control.mean > 1 and mixed.same_sign_every_seed is False


def test_table_says_when_the_mean_holds_but_not_every_seed():
    arms = summarise(HAND_ROWS, CONTROL)
    payload = {
        "architecture": "dense", "max_steps": 5, "command": "decollapse ablate …", "columns": ["arm"],
        "grid": {}, "headline": {"head |cos|": ["layer*.cos", "max"]}, "seeds": [0, 1, 2], "control": CONTROL,
        "rows": HAND_ROWS, "arms": [dataclasses.asdict(a) for a in arms],
    }
    table = to_markdown(payload)
    assert "| arm | val ppl | ratio to optimum | val ppl ÷ control | same sign on every seed | head \\|cos\\| |" in table
    assert "| control | 100.000 ± 10.000 | 2.000 ± 0.200 | 1 (control) | – | 0.400 ± 0.200 |" in table
    assert "| better | 91.667 ± 9.452 | 1.833 ± 0.189 | 0.9167 ± 0.0289 | yes |" in table
    assert "| mixed | 103.000 ± 16.093 | 2.060 ± 0.322 | 1.0267 ± 0.0643 | **no** |" in table
    assert "`arm=mixed`: mean ratio 1.0267 to the control, but the effect does not have the same sign on every seed: " \
        "-2.000% (seed 0), +10.000% (seed 1), +0.000% (seed 2)." in table
    assert "`arm=better`: mean ratio" not in table
    assert "Every seed:" not in table
    per_seed = to_markdown(payload, per_seed=True)
    assert "| arm | seed | val ppl | ratio to optimum | val ppl ÷ control | head \\|cos\\| |" in per_seed
    assert "| better | 2 | 81.000 | 1.620 | 0.9000 | 0.500 |" in per_seed


def test_one_seed_shows_the_value_without_a_spread():
    arms = summarise([_row(CONTROL, 0, 100.0), _row(BETTER, 0, 95.0)], CONTROL)
    assert arms[1].validation_perplexity.std is None and arms[1].ratio_to_control.std is None
    assert arms[1].ratio_to_control.values == [0.95] and arms[1].same_sign_every_seed is None
    payload = {
        "architecture": "dense", "max_steps": 5, "command": "c", "columns": ["arm"], "grid": {},
        "headline": {}, "seeds": [0], "control": CONTROL, "rows": [], "arms": [dataclasses.asdict(a) for a in arms],
    }
    table = to_markdown(payload)
    assert "| better | 95.000 | 1.900 | 0.9500 | – |" in table and "±" not in table


@pytest.mark.parametrize("text", ["", "0,,1", "a", "-1", "1.5", "0,1,0"])
def test_seeds_must_be_distinct_non_negative_integers(text):
    with pytest.raises(UsageError, match="--seeds"):
        parse_seeds(text)
    assert parse_seeds("3, 1,2") == [3, 1, 2]


def test_control_uses_the_case_syntax():
    assert parse_control("routing=adaptive routing_grad=ste") == {"routing": "adaptive", "routing_grad": "ste"}
    with pytest.raises(UsageError, match="--control"):
        parse_control("routing")


@pytest.mark.parametrize(("extra", "message"), [
    (["--control", "lr=1"], "--control 'lr=1': lr is not varied; the arms vary head_diversity_weight"),
    (["--control", "head_diversity_weight=0.5"], "--control 'head_diversity_weight=0.5': no arm has these values"),
    (["--seeds", "0,1,0"], "--seeds '0,1,0': seed 0 given twice"),
    (["--seeds", "0,x"], "--seeds '0,x': expected comma-separated non-negative integers"),
    (["--seeds", "0,1", "--set", "train.seed=3"], "train.seed: given both by --seeds and in --set/--grid/--case"),
])
def test_ablate_refuses_bad_seeds_or_control_before_training(tmp_path, capsys, extra, message):
    out = tmp_path / "abl"
    code = main(["ablate", "dense", "--max-steps", "3", "--output-dir", str(out),
                 "--grid", "head_diversity_weight=0,0.1", *extra])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists() and _leftovers(tmp_path) == []


def test_ablate_control_must_name_exactly_one_arm(tmp_path, capsys):
    code = main(["ablate", "moh", "--output-dir", str(tmp_path / "a"), "--case", "routing=all",
                 "--case", "routing=adaptive routing_grad=ste", "--case", "routing=adaptive routing_grad=none",
                 "--control", "routing=adaptive"])
    assert code == 2
    assert "matches 2 arms" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


DENSE_TINY = ["hidden_size=16", "num_attention_heads=2", "warmup_steps=0"]


def test_ablate_seeds_pair_every_arm_with_the_control_run_of_the_same_seed(tmp_path, capsys):
    out = tmp_path / "abl"
    # logging_steps does not touch the model or the data: with the same seed its twin must train the
    # same model on the same batches (ratio exactly 1), which only holds if a seed fixes the data order.
    code = main([
        "ablate", "dense", "--max-steps", "3", "--output-dir", str(out), "--seeds", "0,1",
        "--case", "learning_rate=0.003 logging_steps=5", "--case", "learning_rate=0.003 logging_steps=2",
        "--case", "learning_rate=0.03 logging_steps=5", "--control", "learning_rate=0.003 logging_steps=5",
        "--per-seed",
        "--set", *[s for s in TINY_CORPUS if not s.startswith("train.logging_steps")], *DENSE_TINY,
    ])
    assert code == 0
    payload = json.loads((out / "ablation.json").read_text())
    assert payload["seeds"] == [0, 1]
    assert payload["control"] == {"learning_rate": "0.003", "logging_steps": "5"}
    assert [(r["settings"]["logging_steps"], r["settings"]["learning_rate"], r["seed"]) for r in payload["rows"]] == [
        ("5", "0.003", 0), ("5", "0.003", 1), ("2", "0.003", 0), ("2", "0.003", 1), ("5", "0.03", 0), ("5", "0.03", 1)
    ]
    ppl = {(r["settings"]["learning_rate"], r["settings"]["logging_steps"], r["seed"]): r["metrics"]["validation_perplexity"]
           for r in payload["rows"]}
    for row in payload["rows"]:
        assert (out / row["run"] / "model.safetensors").is_file() and row["run"].endswith(f"__seed={row['seed']}")
    assert ppl[("0.003", "5", 0)] != ppl[("0.003", "5", 1)], "a seed changes the run"
    control, twin, faster = payload["arms"]
    assert control["is_control"] and control["ratio_to_control"]["values"] == [1.0, 1.0]
    assert twin["ratio_to_control"]["values"] == [1.0, 1.0], "same seed: same initialisation and data order"
    assert faster["seeds"] == [0, 1]
    for seed, ratio in zip(faster["seeds"], faster["ratio_to_control"]["values"]):
        assert ratio == pytest.approx(ppl[("0.03", "5", seed)] / ppl[("0.003", "5", seed)], rel=1e-12)
        assert ratio != 1.0
    mean = sum(faster["ratio_to_control"]["values"]) / 2
    assert faster["ratio_to_control"]["mean"] == pytest.approx(mean)
    assert faster["validation_perplexity"]["values"] == [ppl[("0.03", "5", 0)], ppl[("0.03", "5", 1)]]
    printed = capsys.readouterr().out
    assert "[6/6]" in printed and "Every seed:" in printed and "| val ppl ÷ control |" in printed
    table = (out / "ablation.md").read_text()
    assert "--seeds 0,1 --control 'learning_rate=0.003 logging_steps=5'" in table
    assert "Every seed:" in table, "the written record keeps every seed's row"
    assert _leftovers(tmp_path) == []


def test_ablate_with_seeds_alone_runs_the_recipe_as_it_stands_once_per_seed(tmp_path, capsys):
    out = tmp_path / "abl"
    code = main([
        "ablate", "dense", "--max-steps", "3", "--output-dir", str(out), "--seeds", "0,1", "--per-seed",
        "--set", *TINY_CORPUS, *DENSE_TINY,
    ])
    assert code == 0
    payload = json.loads((out / "ablation.json").read_text())
    assert [(r["run"], r["seed"], r["settings"]) for r in payload["rows"]] == [("runs/seed=0", 0, {}), ("runs/seed=1", 1, {})]
    (arm,) = payload["arms"]
    assert len(set(arm["validation_perplexity"]["values"])) == 2, "each seed is its own run"
    table = (out / "ablation.md").read_text()
    assert "| val ppl | ratio to optimum |" in table and "Every seed:" in table
    assert "decollapse ablate dense --max-steps 3 --seeds 0,1 --set" in table
    assert _leftovers(tmp_path) == []


def test_ablate_without_arms_or_seeds_says_what_to_name(tmp_path, capsys):
    code = main(["ablate", "dense", "--output-dir", str(tmp_path / "a")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "name at least one --grid" in err[0] and "--seeds" in err[0]
    assert not (tmp_path / "a").exists()
