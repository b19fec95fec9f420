"""Heat-maps of a metric over two `decollapse ablate` grid axes: the cell values (mean over seeds), the
axis order, every bad input (one line, exit 2, nothing written), and a real tiny `ablate --heatmap`."""

import csv
import json
import math
from pathlib import Path

import pytest

import decollapse.ablation as ablation
import decollapse.runner as runner
from decollapse.ablation import AblationJob, plan_ablation, run_ablation, run_name
from decollapse.cli import main
from decollapse.heatmap import ablation_run_metrics, build_heatmap, expected_metrics, figure, read_ablation
from decollapse.registry import ARCHITECTURES

from .test_cli import TINY_CORPUS

# Grid values whose given order is not their sorted order: the axes must follow the order given.
GRID = {"hidden_size": ["64", "16"], "train.learning_rate": ["0.01", "0.001", "0.003"]}
SEEDS = [0, 1, 2]


def _perplexity(hidden, lr, seed):
    return 100.0 - int(hidden) + 1000 * float(lr) + seed


def _write_ablation(folder: Path, grid=GRID, seeds=SEEDS, cases=(), value=_perplexity, diagnostics=None):
    """An ablation folder as `decollapse ablate` writes it (ablation.json, runs/*/metrics.json and
    diagnostics.json), without training: ``value(*cell, seed)`` is each run's validation perplexity,
    ``diagnostics(*cell, seed)`` its collapse-report metrics."""
    keys = list(grid)
    cells = [(a, b) for a in grid[keys[0]] for b in grid[keys[1]]] if len(keys) == 2 else [(a,) for a in grid[keys[0]]]
    rows = []
    for case in cases or [{}]:
        for cell in cells:
            settings = {**case, **dict(zip(keys, cell))}
            for seed in seeds:
                name = f"runs/{run_name({**settings, 'seed': str(seed)})}"
                run = folder / name
                run.mkdir(parents=True)
                metrics = {"architecture": "dense", "steps": 5, "num_parameters": 1000 * len(cell),
                           "metrics": {"validation_perplexity": value(*cell, seed), "epoch": 0.5}}
                (run / "metrics.json").write_text(json.dumps(metrics))
                report = diagnostics(*cell, seed) if diagnostics else {"layer0.heads.similar_pair_fraction": 0.1}
                (run / "diagnostics.json").write_text(json.dumps({"step": 5, "metrics": report, "matrices": {}}))
                rows.append({"settings": settings, "seed": seed, "run": name})
    payload = {"architecture": "dense", "grid": grid, "cases": list(cases), "max_steps": 5, "seeds": seeds,
               "rows": rows, "arms": [], "headline": {}, "command": "decollapse ablate dense …"}
    (folder / "ablation.json").write_text(json.dumps(payload))
    return folder


def _csv(path: Path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _snapshot(folder: Path):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_cells_are_the_mean_over_seeds_in_the_given_axis_order(tmp_path, capsys):
    folder = _write_ablation(tmp_path / "abl")
    assert main(["heatmap", str(folder), "--metric", "validation_perplexity"]) == 0
    png, table = folder / "heatmaps" / "validation_perplexity.png", folder / "heatmaps" / "validation_perplexity.csv"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _csv(table)
    # The first --grid axis on the rows, the second on the columns, each in the order given.
    assert [(r["hidden_size"], r["train.learning_rate"]) for r in rows] == [
        ("64", "0.01"), ("64", "0.001"), ("64", "0.003"), ("16", "0.01"), ("16", "0.001"), ("16", "0.003")
    ]
    for row in rows:
        values = [_perplexity(row["hidden_size"], row["train.learning_rate"], s) for s in SEEDS]
        assert float(row["mean"]) == pytest.approx(sum(values) / 3)
        assert float(row["std"]) == pytest.approx(1.0), "sample std (n - 1) of seeds 0, 1, 2 around the mean"
        assert row["n"] == "3" and row["seeds"] == "0 1 2" and row["metric"] == "validation_perplexity"
    printed = capsys.readouterr().out
    assert "| hidden_size \\ train.learning_rate | 0.01 | 0.001 | 0.003 |" in printed
    assert "| 64 | 47 (n=3) | 38 (n=3) | 40 (n=3) |" in printed
    assert f"wrote {png}" in printed


def test_a_run_that_lacks_the_metric_leaves_its_cell_with_fewer_seeds(tmp_path):
    # An auxiliary term is only computed when its weight is non-zero: the arm with weight 0 has none.
    def diagnostics(hidden, lr, seed):
        if lr == "0.01" or (hidden, lr, seed) == ("16", "0.001", 2):
            return {}
        return {"layer0.experts.usage_gini": 0.1 * seed + int(hidden) / 100}

    folder = _write_ablation(tmp_path / "abl", diagnostics=diagnostics)
    payload = read_ablation(folder)
    heatmap = build_heatmap(payload, ablation_run_metrics(folder, payload), "layer0.experts.usage_gini",
                            ("hidden_size", "train.learning_rate"))
    assert heatmap.mean(0, 0) is None and heatmap.cells[0][0] == []
    assert heatmap.mean(1, 1) == pytest.approx((0.16 + 0.26) / 2) and heatmap.cells[1][1] == [(0, 0.16), (1, 0.26)]
    assert heatmap.std(1, 1) == pytest.approx(math.sqrt(0.005))
    texts = [t.get_text() for t in figure(heatmap).axes[0].texts]
    assert "n/a" in texts and "0.21\nn=2" in texts and "0.74\nn=3" in texts


def test_the_figure_puts_the_first_axis_on_the_rows_and_axes_swaps_them(tmp_path):
    folder = _write_ablation(tmp_path / "abl")
    payload = read_ablation(folder)
    values = ablation_run_metrics(folder, payload)
    ax = figure(build_heatmap(payload, values, "validation_perplexity", ("hidden_size", "train.learning_rate"))).axes[0]
    assert ax.get_ylabel() == "hidden_size" and ax.get_xlabel() == "train.learning_rate"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["64", "16"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.01", "0.001", "0.003"]
    bottom, top = ax.get_ylim()
    assert bottom < top, "the first value of the row axis at the bottom, as in a plot"
    assert "mean over seeds 0, 1, 2" in ax.get_title()

    assert main(["heatmap", str(folder), "--metric", "validation_perplexity", "--axes", "train.learning_rate,hidden_size",
                 "--output", str(tmp_path / "swapped.png")]) == 0
    rows = _csv(tmp_path / "swapped.csv")
    assert list(rows[0])[:3] == ["metric", "train.learning_rate", "hidden_size"]
    assert [(r["train.learning_rate"], r["hidden_size"]) for r in rows][:2] == [("0.01", "64"), ("0.01", "16")]
    assert (tmp_path / "swapped.png").is_file() and not (folder / "heatmaps").exists()


def test_one_case_shared_by_every_cell_is_drawn_and_named_in_the_title(tmp_path):
    folder = _write_ablation(tmp_path / "abl", cases=[{"routing": "adaptive"}], seeds=[0])
    payload = read_ablation(folder)
    heatmap = build_heatmap(payload, ablation_run_metrics(folder, payload), "num_parameters",
                            ("hidden_size", "train.learning_rate"))
    assert heatmap.mean(0, 0) == 2000.0, "a numeric field of metrics.json is a metric too"
    assert "routing=adaptive" in heatmap.title and "one run per cell (seed 0)" in heatmap.title


def test_list_metrics_names_every_metric_and_how_many_runs_report_it(tmp_path, capsys):
    folder = _write_ablation(tmp_path / "abl", seeds=[0])
    assert main(["heatmap", str(folder), "--list-metrics"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["epoch  (6/6 runs)", "layer0.heads.similar_pair_fraction  (6/6 runs)", "num_parameters  (6/6 runs)",
                     "steps  (6/6 runs)", "validation_perplexity  (6/6 runs)"]
    assert not (folder / "heatmaps").exists()


# --- bad input: one line, exit 2, nothing written --------------------------------------------------


def _refused(capsys, argv, message, folder):
    before = _snapshot(folder)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("decollapse: error:"), err
    assert message in err, err
    assert _snapshot(folder) == before, "nothing written"
    return err


def test_heatmap_refuses_a_folder_that_is_not_an_ablation(tmp_path, capsys):
    _refused(capsys, ["heatmap", str(tmp_path / "nope"), "--metric", "m"], "nope: no such folder", tmp_path)
    _refused(capsys, ["heatmap", str(tmp_path), "--metric", "m"], "not an ablation folder (no ablation.json", tmp_path)
    (tmp_path / "ablation.json").write_text("{not json")
    _refused(capsys, ["heatmap", str(tmp_path), "--metric", "m"], "ablation.json: not readable JSON", tmp_path)
    (tmp_path / "ablation.json").write_text(json.dumps({"architecture": "dense"}))
    _refused(capsys, ["heatmap", str(tmp_path), "--metric", "m"], "not written by `decollapse ablate`", tmp_path)


def test_heatmap_refuses_a_grid_without_two_axes(tmp_path, capsys):
    folder = _write_ablation(tmp_path / "one", grid={"hidden_size": ["16", "32"]}, value=lambda hidden, seed: 50.0)
    _refused(capsys, ["heatmap", str(folder), "--metric", "validation_perplexity"],
             "a heat-map needs exactly two --grid axes, the ablation has 1 (hidden_size)", folder)
    # Arms made by --case alone: no grid axis at all.
    folder = _write_ablation(tmp_path / "cases", grid={"a": ["1"], "b": ["x"]}, cases=[{"routing": "all"}],
                             value=lambda a, b, seed: 50.0)
    payload = json.loads((folder / "ablation.json").read_text())
    payload["grid"] = {}
    (folder / "ablation.json").write_text(json.dumps(payload))
    _refused(capsys, ["heatmap", str(folder), "--metric", "validation_perplexity"],
             "a heat-map needs exactly two --grid axes, the ablation has 0", folder)


def test_heatmap_refuses_three_axes_and_two_cases_over_a_two_axis_grid(tmp_path, capsys):
    folder = _write_ablation(tmp_path / "abl", cases=[{"routing": "all"}, {"routing": "topk"}], seeds=[0])
    _refused(capsys, ["heatmap", str(folder), "--metric", "validation_perplexity"],
             "each cell of the heat-map would hold several arms", folder)
    payload = json.loads((folder / "ablation.json").read_text())
    payload["grid"]["routing"] = ["all", "topk"]
    payload["cases"] = []
    (folder / "ablation.json").write_text(json.dumps(payload))
    _refused(capsys, ["heatmap", str(folder), "--metric", "validation_perplexity"],
             "the ablation has 3 (hidden_size, train.learning_rate, routing)", folder)


def test_heatmap_refuses_a_metric_no_run_reports_and_lists_those_they_do(tmp_path, capsys):
    folder = _write_ablation(tmp_path / "abl", seeds=[0])
    err = _refused(capsys, ["heatmap", str(folder), "--metric", "validation_perplexty"],
                   "--metric validation_perplexty: no run reports 'validation_perplexty'; "
                   "close matches: validation_perplexity; the runs report: epoch, layer0.heads.similar_pair_fraction, "
                   "num_parameters, steps, validation_perplexity", folder)
    assert "…" not in err


def test_a_long_metric_list_is_abbreviated_but_keeps_the_close_matches(tmp_path, capsys):
    many = {f"layer{i}.experts.{m}": 0.5 for i in range(12) for m in ("dead_share", "gini", "usage_gini", "usage")}
    folder = _write_ablation(tmp_path / "abl", seeds=[0], diagnostics=lambda *_: many)
    err = _refused(capsys, ["heatmap", str(folder), "--metric", "layer11.experts.usage_gni"],
                   "close matches: layer11.experts.usage_gini", folder)
    assert "the runs report 52 metrics, the first 40: epoch, layer0.experts.dead_share," in err
    assert "--list-metrics` lists them all" in err
    # Named by its last part only, a metric is found in every layer that reports it.
    err = _refused(capsys, ["heatmap", str(folder), "--metric", "usage_gini"], "close matches:", folder)
    assert "layer0.experts.usage_gini" in err.split("the runs report")[0]


def test_heatmap_refuses_an_incomplete_folder_bad_axes_and_bad_output(tmp_path, capsys):
    folder = _write_ablation(tmp_path / "abl", seeds=[0])
    argv = ["heatmap", str(folder), "--metric", "validation_perplexity"]
    _refused(capsys, argv + ["--axes", "hidden_size"], "--axes 'hidden_size': expected two different --grid keys", folder)
    _refused(capsys, argv + ["--axes", "hidden_size,lr"], "lr is not a --grid axis; the axes are hidden_size, "
             "train.learning_rate", folder)
    _refused(capsys, argv + ["--output", str(tmp_path / "x.svg")], "expected a .png file", folder)
    _refused(capsys, argv + ["--output", str(tmp_path / "no" / "x.png")], "not a file in an existing folder", folder)
    _refused(capsys, ["heatmap", str(folder)], "name the metric to draw with --metric", folder)
    next(folder.glob("runs/*/diagnostics.json")).unlink()
    _refused(capsys, argv, "diagnostics.json: missing; the ablation folder is incomplete", folder)


# --- decollapse ablate --heatmap -------------------------------------------------------------------

DENSE_TINY = ["hidden_size=16", "num_attention_heads=2", "warmup_steps=0"]


@pytest.fixture
def no_run_plots(monkeypatch):
    """Each run's own plots (losses, similarity matrices) are most of a tiny run's time and write nothing
    a heat-map reads (metrics.json, diagnostics.json)."""
    import decollapse.reporting

    monkeypatch.setattr(decollapse.reporting, "write_plots", lambda *args, **kwargs: [])


@pytest.fixture
def nothing_trained(monkeypatch):
    """Training is the first work `run_ablation` does after planning: any run fails the test."""

    def trained(*args, **kwargs):
        raise AssertionError("a run was trained before the bad --heatmap was refused")

    monkeypatch.setattr(ablation, "run", trained)


@pytest.mark.parametrize(("grid", "extra", "message"), [
    (["num_hidden_layers=1,2"], [], "--heatmap: a heat-map needs exactly two --grid axes, the ablation has 1"),
    (["num_hidden_layers=1,2", "intermediate_size=8,16", "learning_rate=0.01"], [], "the ablation has 3"),
    (["num_hidden_layers=1,2", "intermediate_size=8,16"], ["--case", "learning_rate=0.01", "--case", "learning_rate=0.1"],
     "the arms are 2 --case values crossed with the grid"),
    (["num_hidden_layers=1,2", "intermediate_size=8,16"], ["--heatmap-axes", "num_hidden_layers,lr"],
     "lr is not a --grid axis; the axes are num_hidden_layers, intermediate_size"),
    (["num_hidden_layers=1,2", "intermediate_size=8,16"], ["--heatmap-axes", "a,a"], "expected two different --grid keys"),
])
def test_ablate_refuses_a_heatmap_without_two_axes_before_building_anything(
    tmp_path, capsys, monkeypatch, nothing_trained, grid, extra, message
):
    def built(*args, **kwargs):
        raise AssertionError("the data was built before the bad axes were refused")

    monkeypatch.setattr(runner, "load_data", built)
    out = tmp_path / "abl"
    _refused(capsys, ["ablate", "dense", "--max-steps", "2", "--output-dir", str(out), "--grid", *grid, *extra,
                      "--heatmap", "validation_perplexity", "--set", *TINY_CORPUS, *DENSE_TINY], message, tmp_path)
    assert not out.exists()


def test_ablate_refuses_heatmap_axes_without_a_heatmap(tmp_path, capsys, nothing_trained):
    _refused(capsys, ["ablate", "dense", "--output-dir", str(tmp_path / "abl"), "--grid", "num_hidden_layers=1,2",
                      "--heatmap-axes", "a,b"], "--heatmap-axes: only with --heatmap METRIC", tmp_path)


def test_ablate_refuses_a_metric_no_run_will_report_before_training(tmp_path, capsys, nothing_trained):
    out = tmp_path / "abl"
    err = _refused(capsys, [
        "ablate", "dense", "--max-steps", "2", "--output-dir", str(out),
        "--grid", "num_hidden_layers=1,2", "intermediate_size=8,16", "--heatmap", "validation_perplexity",
        "--heatmap", "layer1.heads.similar_pair_fractoin", "--set", *TINY_CORPUS, *DENSE_TINY,
    ], "--heatmap layer1.heads.similar_pair_fractoin: no run reports", tmp_path)
    assert "close matches: layer1.heads.similar_pair_fraction" in err
    assert not out.exists()


def test_ablate_draws_every_heatmap_into_the_folder_it_publishes(tmp_path, capsys, caplog, monkeypatch, no_run_plots):
    import decollapse.heatmap

    # A name the check before training expects but no run reports (none does today: see the test below)
    # must not cost the runs: the ablation is written, without that heat-map, and a warning says so.
    expected = decollapse.heatmap.expected_metrics
    monkeypatch.setattr(decollapse.heatmap, "expected_metrics",
                        lambda runs: {arm: names | {"ghost"} for arm, names in expected(runs).items()})
    out = tmp_path / "abl"
    code = main([
        "ablate", "dense", "--max-steps", "2", "--output-dir", str(out), "--seeds", "0,1",
        "--grid", "intermediate_size=8,16", "num_hidden_layers=1",
        "--heatmap", "validation_perplexity", "--heatmap", "layer0.heads.mean_abs_cosine", "--heatmap", "ghost",
        "--heatmap-axes", "num_hidden_layers,intermediate_size", "--set", *TINY_CORPUS, *DENSE_TINY,
    ])
    assert code == 0
    assert "--heatmap ghost: no run reported it after all, no heat-map drawn (the ablation is written" in caplog.text
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == [
        "layer0.heads.mean_abs_cosine.csv", "layer0.heads.mean_abs_cosine.png",
        "validation_perplexity.csv", "validation_perplexity.png",
    ]
    payload = json.loads((out / "ablation.json").read_text())
    assert payload["command"].endswith(
        "--heatmap validation_perplexity --heatmap layer0.heads.mean_abs_cosine --heatmap ghost "
        "--heatmap-axes num_hidden_layers,intermediate_size --set " + " ".join(TINY_CORPUS + DENSE_TINY)
    )
    runs = {(r["settings"]["intermediate_size"], r["seed"]): out / r["run"] for r in payload["rows"]}
    for metric, source in (("validation_perplexity", "metrics.json"), ("layer0.heads.mean_abs_cosine", "diagnostics.json")):
        assert (out / "heatmaps" / f"{metric}.png").is_file()
        rows = _csv(out / "heatmaps" / f"{metric}.csv")
        assert [(r["num_hidden_layers"], r["intermediate_size"]) for r in rows] == [("1", "8"), ("1", "16")]
        for row in rows:
            values = [json.loads((runs[(row["intermediate_size"], s)] / source).read_text())["metrics"][metric]
                      for s in (0, 1)]
            assert values[0] != values[1], "the seeds differ, so the mean is a real mean"
            assert float(row["mean"]) == pytest.approx(sum(values) / 2) and row["n"] == "2"
    assert "heat-map of layer0.heads.mean_abs_cosine:" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abl"], "no partial folder left"


# Each architecture at a tiny size, with the sosm variants whose settings add or remove report sections.
CASES = [(name, {}) for name in ARCHITECTURES] + [
    ("sosm", ARCHITECTURES["sosm"].variants["contextual graph"]),
    ("sosm", ARCHITECTURES["sosm"].variants["separate networks"]),
    ("dense", {"head_diversity_weight": 0.1, "loss_weighting": "kendall_gal"}),
]


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "variant"), CASES, ids=[f"{a}-{'-'.join(v) or 'default'}" for a, v in CASES])
def test_the_names_checked_before_training_are_the_names_a_run_reports(tmp_path, no_run_plots, arch, variant):
    # A name refused before training that a run would report would be a false refusal; a name accepted
    # that no run reports, a heat-map that cannot be drawn after the training was paid for.
    tiny = {k: v for k, v in ARCHITECTURES[arch].tiny.items() if not isinstance(v, dict)}
    settings = {"hidden_size": 32, "num_hidden_layers": 2, "warmup_steps": 0, **tiny, **variant}
    # The default probe (16 validation rows) while the check evaluates CHECK_EVAL_ROWS: the names must not
    # depend on how many rows either reads.
    corpus = [s for s in TINY_CORPUS if not s.startswith("train.probe_size")]
    job = AblationJob(
        arch=arch, grid={"train.seed": ["0"]}, output_dir=tmp_path / "abl", max_steps=1,
        settings={**dict(s.split("=", 1) for s in corpus), **{k: str(v).lower() if isinstance(v, bool) else str(v)
                                                             for k, v in settings.items()}},
    )
    expected = expected_metrics(plan_ablation(job))
    run_ablation(job)
    payload = read_ablation(job.output_dir)
    reported = ablation_run_metrics(job.output_dir, payload)
    (row,) = payload["rows"]
    assert set(reported[row["run"]]) == expected[run_name(row["settings"])]
