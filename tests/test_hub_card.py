"""The model card: built only from a folder's records, parsed back by huggingface_hub, honest about
what is missing; and the health criteria it shares with the training-time collapse monitor."""

import json
import math
import re
import shutil

import pytest
import torch
from huggingface_hub import ModelCard

from decollapse.hub_cards import PLACEHOLDERS, CardError, build_card, validate_card, write_card
from decollapse.registry import ARCHITECTURES
from decollapse.trainers import callbacks
from decollapse.trainers.callbacks import HEALTH_CRITERIA, CollapseMonitorCallback, collapse_alarms

from .conftest import SHARED_DATA, tiny_model

PIPELINE = {"causal_lm": "text-generation", "masked_lm": "fill-mask"}
ARCH_OBJECTIVES = [(name, obj) for name, arch in ARCHITECTURES.items() for obj in arch.objectives]
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)]+)\)")


def _decollapse_snippet(text: str) -> str:
    after = text.split("**With the decollapse package installed**", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


# ---------------------------------------------------------------------------------------------------
# Bare save_pretrained folders, every architecture and objective
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_card_carries_the_registered_citations_and_limitations(arch, tmp_path):
    tiny_model(arch).save_pretrained(tmp_path)
    text = write_card(tmp_path).read_text()
    for citation in ARCHITECTURES[arch].citations:
        assert citation in text
    assert ARCHITECTURES[arch].limitations in text


@pytest.mark.parametrize("arch,objective", ARCH_OBJECTIVES)
def test_bare_checkpoint_gets_a_valid_card_that_claims_no_training(arch, objective, tmp_path):
    model = tiny_model(arch, objective=objective)
    model.save_pretrained(tmp_path)
    path = write_card(tmp_path)

    assert path == tmp_path / "README.md"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary file was left behind"
    card = ModelCard.load(path)
    assert card.data.library_name == "transformers"
    assert {"decollapse", arch, objective} <= set(card.data.tags)
    assert card.data.pipeline_tag == PIPELINE.get(objective, "feature-extraction")
    assert card.data.license == "apache-2.0"
    assert card.data.eval_results is None and card.data.base_model is None
    text = path.read_text()
    assert "No training record in this folder" in text
    assert "No `diagnostics.json` in this folder" in text and "Verdict" not in text
    assert "No evaluation in this folder" in text
    n_params = sum(p.numel() for p in model.parameters())
    assert f"{n_params:,} parameters" in text
    validate_card(path)

    # The snippet for users with decollapse installed loads this very folder.
    namespace: dict = {}
    exec(_decollapse_snippet(text), namespace)  # noqa: S102 - our own generated snippet
    assert type(namespace["model"]).__name__ == ARCHITECTURES[arch].models[
        {"causal_lm": "AutoModelForCausalLM", "masked_lm": "AutoModelForMaskedLM"}.get(objective, "AutoModel")
    ]
    if objective in ARCHITECTURES[arch].extra_heads:
        assert type(namespace["trained_head"]) is type(model)


def test_base_model_only_for_a_hub_checkpoint(tmp_path):
    model = tiny_model("concept")
    model.config.init_from = "someone/small-encoder"
    model.save_pretrained(tmp_path / "hub")
    card = build_card(tmp_path / "hub")
    assert card.data.base_model == "someone/small-encoder"

    model.config.init_from = str(tmp_path / "local-encoder")
    model.save_pretrained(tmp_path / "local")
    card = build_card(tmp_path / "local")
    assert card.data.base_model is None
    assert f"initialised from `{tmp_path / 'local-encoder'}` (a local path" in str(card)


def _verdict(text: str) -> str:
    return text.split("**Verdict: ", 1)[1].split("**", 1)[0]


def test_concept_grades_are_tabled_and_poor_grades_are_collapse_signs(tmp_path):
    model = tiny_model("concept").eval()
    model.save_pretrained(tmp_path)
    ids = torch.randint(5, 61, (4, 16), generator=torch.Generator().manual_seed(0))
    report = model.collapse_report({"input_ids": ids})
    (tmp_path / "diagnostics.json").write_text(json.dumps({"step": 0, **report.to_dict()}))
    text = str(build_card(tmp_path))

    grades = {k[: -len(".grade")]: v for k, v in report.metrics.items() if k.endswith(".grade")}
    assert grades and "| metric | value | grade | POOR / OK / GOOD edges |" in text
    for name, grade in grades.items():
        assert f"| {name} | {report.metrics[name]:.4g} | {['POOR', 'OK', 'GOOD'][int(grade)]} |" in text
    poor = [name for name, grade in grades.items() if grade == 0.0]
    verdict = _verdict(text)
    assert all(f"`{name}` graded POOR" in verdict for name in poor)
    assert verdict.startswith("collapse signs") == bool(poor or collapse_alarms(report.metrics, 0))


def test_a_tripped_criterion_and_training_alarms_are_reported(tmp_path):
    tiny_model("dense").save_pretrained(tmp_path)
    metrics = {"layer0.neurons.dead_share": 0.75, "layer1.neurons.dead_share": 0.1,
               "layer0.neurons.similar_pair_fraction": 0.2}
    (tmp_path / "diagnostics.json").write_text(json.dumps({"step": 40, "metrics": metrics}))
    alarm = {"step": 40, "criterion": "dead_unit_ceiling", "message": "layer0.neurons.dead_share=0.75 > 0.5 at step 40"}
    (tmp_path / "metrics.json").write_text(json.dumps({"dataset": "synthetic", "steps": 40, "alarms": [alarm]}))
    text = str(build_card(tmp_path))

    assert _verdict(text) == "collapse signs: dead_unit_ceiling (`layer0.neurons.dead_share` = 0.75)."
    assert "| `layer0.neurons.dead_share` | 0.75 | 0.5 | **fail** |" in text
    assert "| `layer0.neurons.similar_pair_fraction` | 0.2 | 0.9 | pass |" in text
    assert "| effective_rank_floor |" in text and "none in this report | – | 0.05 | not measured |" in text
    assert f"- step 40: dead_unit_ceiling: {alarm['message']}" in text
    # A summary without a training log says which record is missing, not that there is no record.
    assert "No training record" not in text and "No `training_log.json` in this folder" in text


def test_folder_errors_are_one_line(tmp_path):
    with pytest.raises(CardError, match="no config.json"):
        build_card(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CardError, match="not a decollapse architecture"):
        build_card(tmp_path)
    tiny_model("dense").save_pretrained(tmp_path)
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(CardError, match="metrics.json: not readable JSON"):
        build_card(tmp_path)
    (tmp_path / "metrics.json").unlink()
    with pytest.raises(CardError, match="repo id"):
        build_card(tmp_path, repo_id="not a repo id")


# ---------------------------------------------------------------------------------------------------
# A real short run and a real zero-shot evaluation
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    if not SHARED_DATA.is_dir():
        pytest.skip("shared/data is not beside the checkout")
    from decollapse.eval_suites import EvalJob
    from decollapse.eval_suites import run as run_eval
    from decollapse.runner import TrainJob, run

    out = tmp_path_factory.mktemp("card") / "dense"
    settings = {
        "eval_steps": "10",
        "logging_steps": "5",  # training logs inside 20 steps, so there are loss terms to report
        "head_diversity_weight": "0.1",  # one auxiliary term
        "loss_weighting": "kendall_gal",
    }
    run(TrainJob(arch="dense", max_steps=20, output_dir=out, settings=settings))
    run_eval(EvalJob(model=str(out), suite="stsb", protocol="zeroshot", data_dir=SHARED_DATA,
                     max_eval_samples=20, show_progress=False))
    return out


@pytest.fixture(scope="module")
def card_text(run_dir):
    return write_card(run_dir).read_text()


def test_model_index_round_trips_the_eval_results(run_dir, card_text):
    rows = json.loads((run_dir / "eval_results.json").read_text())["results"]
    assert rows and all(math.isfinite(r["value"]) for r in rows)
    card = ModelCard.load(run_dir / "README.md")
    results = card.data.eval_results
    assert [r.metric_value for r in results] == [r["value"] for r in rows]
    assert [(r.metric_type, r.dataset_split, r.dataset_type, r.dataset_config) for r in results] == [
        (r["metric"], r["split"], "nyu-mll/glue", "stsb") for r in rows
    ]
    assert card.data.model_name == "dense"
    # The smoke-run caveat stays with the numbers, in the body and in the Hub's metric names.
    assert "scored on 20 of 1500 rows" in card_text
    assert all("scored on 20 of 1500 rows" in r.metric_name for r in results)
    assert "From `eval_results.json`, written by `decollapse eval`" in card_text


def test_final_loss_terms_come_from_the_training_log(run_dir, card_text):
    log = json.loads((run_dir / "training_log.json").read_text())
    last = {}
    for entry in log:
        last.update({k: v for k, v in entry.items() if isinstance(v, float)})
    for key in ("loss", "task_loss", "aux/head_similarity", "aux_weighted/head_similarity", "eval_loss", "train_loss"):
        assert key in last, f"the run logged no {key}"
        assert f"| `{key}` | {last[key]:.4g} |" in card_text, key
    assert "`kendall_gal`" in card_text and "Kendall, Gal & Cipolla 2018" in card_text
    learned = json.loads((run_dir / "loss_weighting.json").read_text())["log_vars"]
    assert all(f"{k} = {v:.4g}" in card_text for k, v in learned.items())
    assert "No training record" not in card_text


def test_diagnostics_table_and_verdict(run_dir, card_text):
    metrics = json.loads((run_dir / "diagnostics.json").read_text())["metrics"]
    for criterion in HEALTH_CRITERIA.values():
        values = {k: v for k, v in metrics.items() if k.endswith(criterion.suffix)}
        worst = (min if criterion.worst == "min" else max)(values, key=values.get)
        assert f"| {criterion.name} |" in card_text
        assert f"`{worst}` | {values[worst]:.4g} | {criterion.threshold:g} |" in card_text
    tripped = [a.criterion for a in collapse_alarms(metrics, 0)]
    expected = "collapse signs: " if tripped else "no collapse criterion tripped"
    assert f"**Verdict: {expected}" in card_text
    assert all(name in card_text.split("**Verdict:")[1].split("\n")[0] for name in tripped)


def test_plots_are_embedded_and_exist(run_dir, card_text):
    links = IMAGE_LINK.findall(card_text)
    assert "plots/losses.png" in links
    assert sorted(links) == sorted(f"plots/{p.name}" for p in (run_dir / "plots").glob("*.png"))
    assert all((run_dir / link).is_file() for link in links)


def test_card_is_clean_and_the_snippet_runs(run_dir, card_text):
    assert not [p for p in PLACEHOLDERS if p.lower() in card_text.lower()]
    validate_card(run_dir / "README.md")
    namespace: dict = {}
    exec(_decollapse_snippet(card_text), namespace)  # noqa: S102 - generates 20 tokens from the folder
    assert type(namespace["model"]).__name__ == "DenseForCausalLM"


def test_repo_id_names_the_model_and_the_snippets(run_dir):
    card = build_card(run_dir, repo_id="someone/dense-smoke")
    assert card.data.model_name == "someone/dense-smoke"
    assert 'from_pretrained("someone/dense-smoke", trust_remote_code=True)' in str(card)
    assert str(run_dir) not in _decollapse_snippet(str(card))
    # A card written into a staging folder names the folder's final place.
    final = run_dir.parent / "published"
    card = build_card(run_dir, local_path=final)
    assert card.data.model_name == "published"
    assert f'from_pretrained("{final}")' in _decollapse_snippet(str(card)) and str(run_dir) not in str(card)


def test_validate_card_rejects_placeholders_broken_yaml_and_missing_keys(run_dir, tmp_path):
    text = (run_dir / "README.md").read_text()
    bad = tmp_path / "README.md"

    bad.write_text(text.replace("## Limitations\n", "## Limitations\n\n[More Information Needed]\n"))
    with pytest.raises(CardError, match="placeholder"):
        validate_card(bad)
    bad.write_text(text.replace("license: apache-2.0", "license: [apache-2.0"))
    with pytest.raises(CardError, match="metadata does not parse"):
        validate_card(bad)
    bad.write_text(text.replace("pipeline_tag: text-generation\n", ""))
    with pytest.raises(CardError, match="lacks pipeline_tag"):
        validate_card(bad)
    card = ModelCard(text)
    card.text += "\nTODO: fill in\n"
    with pytest.raises(CardError, match="TODO"):
        validate_card(card)


def test_undefined_values_stay_out_of_the_model_index(run_dir, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(run_dir, folder)
    payload = json.loads((folder / "eval_results.json").read_text())
    nan_row = dict(payload["results"][0], split="test", value=float("nan"), values=[float("nan")])
    payload["results"].append(nan_row)
    (folder / "eval_results.json").write_text(json.dumps(payload))
    card = ModelCard.load(write_card(folder))
    assert len(card.data.eval_results) == len(payload["results"]) - 1
    assert "Left out of the model-index because the value is undefined (n/a): stsb pearson (test)" in card.text


# ---------------------------------------------------------------------------------------------------
# The health criteria shared with CollapseMonitorCallback
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("criterion", list(HEALTH_CRITERIA.values()), ids=list(HEALTH_CRITERIA))
def test_collapse_alarms_trip_exactly_past_the_threshold(criterion):
    at = {f"layer0.units.{criterion.suffix}": criterion.threshold}
    assert collapse_alarms(at, 3) == []
    nudge = -1e-9 if criterion.worst == "min" else 1e-9
    healthy_side = criterion.threshold - 10 * nudge
    # The worst of several groups decides; a healthy group beside it does not hide it.
    past = {
        f"layer0.units.{criterion.suffix}": healthy_side,
        f"layer1.units.{criterion.suffix}": criterion.threshold + nudge,
    }
    alarms = collapse_alarms(past, 3)
    assert [a.criterion for a in alarms] == [criterion.name]
    assert alarms[0].message.startswith(f"layer1.units.{criterion.suffix}=")
    assert alarms[0].message.endswith(f"{criterion.op} {criterion.threshold} at step 3")
    assert collapse_alarms(past, 3, {criterion.name: None}) == []


def test_the_monitor_judges_with_collapse_alarms(monkeypatch):
    monitor = CollapseMonitorCallback({})
    assert monitor.effective_rank_floor == HEALTH_CRITERIA["effective_rank_floor"].threshold
    assert monitor.similar_pair_ceiling == HEALTH_CRITERIA["similar_pair_ceiling"].threshold
    assert monitor.dead_unit_ceiling == HEALTH_CRITERIA["dead_unit_ceiling"].threshold

    seen = []

    def fake(metrics, step, thresholds=None):
        seen.append((metrics, step, thresholds))
        return ["sentinel"]

    monkeypatch.setattr(callbacks, "collapse_alarms", fake)
    custom = CollapseMonitorCallback({}, effective_rank_floor=0.2, similar_pair_ceiling=None, dead_unit_ceiling=0.4)
    assert custom.check_report({"x": torch.tensor(1.0).item()}, 7) == ["sentinel"]
    assert seen == [({"x": 1.0}, 7, {"effective_rank_floor": 0.2, "similar_pair_ceiling": None,
                                      "dead_unit_ceiling": 0.4})]
