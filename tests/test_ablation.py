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
