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
