"""``decollapse export`` / ``push``: a checkpoint works like any Hub model without decollapse installed.

One module-scoped fixture does the expensive part once: a short real training run and a zero-shot
eval per architecture, an export of each, plus tiny models of every head exported from a plain
``save_pretrained``; then ONE fresh Python process, in which ``import decollapse`` is blocked, loads
every exported folder with ``trust_remote_code=True`` and writes what it computed. The tests below
are parametrized over the registry, so an architecture added later is covered without editing them.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from decollapse.cli import main
from decollapse.hub_cards import ExportError, bundle_sources, export_checkpoint, validate_card
from decollapse.hub_cards.export import PICKLE_SUFFIXES
from decollapse.remote_code import ALLOWED_IMPORT_ROOTS
from decollapse.registry import ARCHITECTURES, OBJECTIVE_AUTO_CLASSES

from .conftest import BLOCK_DECOLLAPSE, SHARED_DATA, tiny_config

IDS = torch.tensor([[5, 9, 12, 7, 30, 8, 11, 6], [14, 5, 5, 20, 9, 13, 10, 4]])
SENTENCES = ["w5 w9 w12 w7", "w30 w8"]
# Every head of every architecture: (arch, objective or class name).
HEADS = [(a, o) for a in ARCHITECTURES for o in ARCHITECTURES[a].objectives] + [
    (a, cls) for a in ARCHITECTURES for auto, cls in ARCHITECTURES[a].models.items()
    if auto not in ("AutoModel", *OBJECTIVE_AUTO_CLASSES.values())
]

FRESH_PROCESS = BLOCK_DECOLLAPSE + r'''
import json, os
try:
    import decollapse  # noqa: F401
    blocked = False
except ImportError:
    blocked = True

import torch
import transformers
from safetensors.torch import save_file

transformers.logging.set_verbosity_error()  # load reports of heads' unused weights would bury a traceback
from transformers.dynamic_module_utils import get_class_from_dynamic_module

jobs = json.loads(open(sys.argv[1]).read())
ids = torch.tensor(jobs["ids"])
report = {"blocked": blocked, "folders": {}}
for job in jobs["folders"]:
    folder, out = job["folder"], {}
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
    out["config_class"] = type(config).__name__
    # The card's snippet: the tokenizer loads beside the remote code, without decollapse.
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        out["tokenizer_size"] = len(transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True))
    tensors = {}
    with torch.no_grad():
        for auto_name in job["auto_classes"]:
            model = getattr(transformers, auto_name).from_pretrained(folder, trust_remote_code=True).eval()
            out[auto_name] = type(model).__name__
            result = model(input_ids=ids)
            tensors[auto_name] = (result.logits if auto_name != "AutoModel" else result.last_hidden_state).contiguous()
        if job.get("extra_class"):
            cls = get_class_from_dynamic_module(f"{job['module']}.{job['extra_class']}", folder)
            model = cls.from_pretrained(folder)
            out["extra_class"] = type(model).__name__
            for name, value in model.state_dict().items():
                tensors[f"state.{name}"] = value.clone()  # tied weights share storage; safetensors refuses that
        if job.get("sentences"):
            from sentence_transformers import SentenceTransformer

            st = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
            tensors["sentence_embedding"] = torch.as_tensor(st.encode(job["sentences"], convert_to_tensor=True)).contiguous()
    save_file(tensors, job["result"])
    report["folders"][folder] = out
report["decollapse_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "decollapse")
print(json.dumps(report))
'''


def tiny_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(specials)} | {f"w{i}": i for i in range(len(specials), vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )


def tiny_head(arch: str, head: str):
    """A tiny model of one head: ``head`` is an objective or a model class name."""
    spec = ARCHITECTURES[arch]
    torch.manual_seed(0)
    if head in spec.objectives:
        return spec.model_for_objective(head)(tiny_config(arch, objective=head))
    return spec.class_named(head)(tiny_config(arch, num_labels=3))


def _auto_classes(arch: str, class_name: str) -> list[str]:
    """The Auto classes that should load ``class_name``'s checkpoint: AutoModel, and its own one."""
    own = [auto for auto, cls in ARCHITECTURES[arch].models.items() if cls == class_name and auto != "AutoModel"]
    return ["AutoModel", *own]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Everything exported, the in-package reference outputs, and the fresh process's report."""
    from decollapse.eval_suites import EvalJob
    from decollapse.eval_suites import run as run_eval
    from decollapse.runner import TrainJob
    from decollapse.runner import run as run_train

    root = tmp_path_factory.mktemp("export")
    entries: dict[str, dict] = {}

    def add(key: str, src: Path, model, sentences: bool) -> None:
        out = export_checkpoint(src, root / "hub" / key, repo_id=f"decollapse-tests/{key}")
        class_name = type(model).__name__
        spec = ARCHITECTURES[key.split("-")[0]]
        autos = _auto_classes(spec.name, class_name)
        expected = {}
        with torch.no_grad():
            for auto in autos:
                reference = spec.model_class(auto).from_pretrained(str(src)).eval() if auto == "AutoModel" else model
                result = reference(input_ids=IDS)
                expected[auto] = result.logits if auto != "AutoModel" else result.last_hidden_state
        job = {"folder": str(out), "auto_classes": autos, "result": str(root / f"{key}.result.safetensors")}
        if class_name in spec.extra_heads.values():
            job.update(extra_class=class_name, module=f"modeling_{spec.name}")
            expected.update({f"state.{k}": v for k, v in model.state_dict().items()})
        if sentences and (out / "modules.json").is_file():
            from decollapse.eval_suites.sentence import ModelRef, to_sentence_transformer

            st = to_sentence_transformer(ModelRef(str(src)), max_seq_length=model.config.max_position_embeddings)
            expected["sentence_embedding"] = st.encode(SENTENCES, convert_to_tensor=True)
            job["sentences"] = SENTENCES
        entries[key] = {"src": src, "out": out, "job": job, "expected": expected, "class": class_name}

    # A short real run of every architecture, evaluated zero-shot on 20 STS-B rows when the data is there.
    for arch in ARCHITECTURES:
        run_dir = root / "runs" / arch
        job = TrainJob(arch=arch, output_dir=run_dir, max_steps=10,
                       settings={"eval_steps": 5, "logging_steps": 5})
        run_train(job)
        if SHARED_DATA.is_dir():
            run_eval(EvalJob(model=str(run_dir), suite="stsb", protocol="zeroshot", data_dir=SHARED_DATA,
                             max_eval_samples=20, show_progress=False))
        objective = json.loads((run_dir / "config.json").read_text())["objective"]
        model = ARCHITECTURES[arch].model_for_objective(objective).from_pretrained(str(run_dir)).eval()
        add(f"{arch}-trained", run_dir, model, sentences=True)

    # Every head, tiny, from a plain save_pretrained plus a tokenizer.
    for arch, head in HEADS:
        model = tiny_head(arch, head).eval()
        src = root / "saved" / f"{arch}-{head}"
        model.save_pretrained(str(src))
        tiny_tokenizer(model.config.vocab_size).save_pretrained(str(src))
        add(f"{arch}-{head}", src, model, sentences=head == ARCHITECTURES[arch].objectives[0])

    # The transformers way to share custom code: register_for_auto_class, then save_pretrained.
    for arch in ARCHITECTURES:
        objective = ARCHITECTURES[arch].objectives[0]
        model = tiny_head(arch, objective).eval()
        cls = type(model)
        auto = OBJECTIVE_AUTO_CLASSES.get(objective, "AutoModel")
        cls.register_for_auto_class(auto)
        try:
            folder = root / "registered" / arch
            model.save_pretrained(str(folder))
        finally:
            cls._auto_class = None  # a class attribute: do not leak it into other tests
        with torch.no_grad():
            result = model(input_ids=IDS)
        expected = {auto: result.logits if auto != "AutoModel" else result.last_hidden_state}
        job = {"folder": str(folder), "auto_classes": [auto], "result": str(root / f"{arch}-registered.result.safetensors")}
        entries[f"{arch}-registered"] = {"src": folder, "out": folder, "job": job, "expected": expected, "class": cls.__name__}

    manifest = root / "jobs.json"
    manifest.write_text(json.dumps({"ids": IDS.tolist(), "folders": [e["job"] for e in entries.values()]}))
    script = root / "fresh_process.py"
    script.write_text(FRESH_PROCESS)
    env = {**os.environ, "HF_MODULES_CACHE": str(root / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run(
        [sys.executable, str(script), str(manifest)], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {"entries": entries, "report": report}


def _entries(exported, arch):
    return {k: e for k, e in exported["entries"].items() if k.split("-")[0] == arch}


def test_the_fresh_process_could_not_import_decollapse(exported):
    assert exported["report"]["blocked"] is True
    assert exported["report"]["decollapse_modules"] == []


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_export_loads_without_decollapse_and_computes_the_same(exported, arch):
    entries = _entries(exported, arch)
    assert f"{arch}-trained" in entries
    for key, entry in entries.items():
        seen = exported["report"]["folders"][str(entry["out"])]
        assert seen["config_class"] == ARCHITECTURES[arch].config
        if key.endswith("-registered"):
            assert "tokenizer_size" not in seen, key  # saved without a tokenizer, like any bare save_pretrained
        else:
            from transformers import AutoTokenizer

            assert seen["tokenizer_size"] == len(AutoTokenizer.from_pretrained(str(entry["src"]))), key
        for auto in entry["job"]["auto_classes"]:
            assert seen[auto] == (entry["class"] if auto != "AutoModel" else ARCHITECTURES[arch].models["AutoModel"]), key
        got = load_file(entry["job"]["result"])
        assert set(got) == set(entry["expected"]), key
        for name, value in entry["expected"].items():
            if name == "sentence_embedding":
                torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=f"{key} {name}")
            else:
                assert torch.equal(got[name], value), f"{key}: {name} differs from the in-package model"


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_exported_encoder_loads_in_sentence_transformers(exported, arch):
    trained = _entries(exported, arch)[f"{arch}-trained"]
    base = ARCHITECTURES[arch].model_class("AutoModel")
    if getattr(base, "sentence_pooling", "tokens") not in ("tokens", "concepts"):
        pytest.skip(f"{arch} has no pooling path")
    assert "sentence_embedding" in trained["expected"]
    embedding = load_file(trained["job"]["result"])["sentence_embedding"]
    width = json.loads((trained["out"] / "config.json").read_text())["hidden_size"]
    assert embedding.shape == (len(SENTENCES), width)
    assert torch.isfinite(embedding).all()


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_bundle_holds_only_its_architecture_code_and_no_pickles(exported, arch):
    out = _entries(exported, arch)[f"{arch}-trained"]["out"]
    code = {p.name for p in out.glob("*.py")}
    expected = set(bundle_sources(arch))
    if (out / "sentence_pooling.py").is_file():
        expected.add("sentence_pooling.py")
    assert code == expected
    # Another architecture's files travel only when this one's code imports them (block reuse).
    others = {f"modeling_{a}.py" for a in ARCHITECTURES if a != arch} | {f"configuration_{a}.py" for a in ARCHITECTURES if a != arch}
    assert code & others == expected & others
    local = {p.stem for p in out.glob("*.py")}
    for path in out.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [(node.module or "").split(".")[0]]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 1 and node.module in local, f"{path.name}: from {'.' * node.level}{node.module}"
                continue
            else:
                continue
            assert set(roots) <= ALLOWED_IMPORT_ROOTS, f"{path.name} imports {roots}"
    assert not [p for p in out.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoConfig"] == f"configuration_{arch}.{ARCHITECTURES[arch].config}"


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_exported_card_validates_and_carries_results_and_diagnostics(exported, arch):
    from huggingface_hub import ModelCard

    entry = _entries(exported, arch)[f"{arch}-trained"]
    out = entry["out"]
    validate_card(out / "README.md")
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers"
    assert arch in card.data.tags and "decollapse" in card.data.tags
    diagnostics = json.loads((out / "diagnostics.json").read_text())["metrics"]
    assert any(name in card.text for name in diagnostics), "no diagnostics metric named in the card"
    for link in __import__("re").findall(r"\]\((plots/[^)]+\.png)\)", card.text):
        assert (out / link).is_file(), link
    if SHARED_DATA.is_dir():
        rows = json.loads((out / "eval_results.json").read_text())["results"]
        values = sorted(round(r["value"], 6) for r in rows)
        assert sorted(round(r.metric_value, 6) for r in card.data.eval_results) == values
        assert "scored on 20 of 1500 rows" in card.text


# ---------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------------


def _one_line_error(capsys, argv) -> str:
    capsys.readouterr()  # what the test itself printed before (progress bars of its own saves)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("decollapse: error: "), err
    return err


def test_export_refuses_bad_input_and_writes_nothing(exported, tmp_path, capsys):
    run_dir = _entries(exported, "dense")["dense-trained"]["src"]
    out = tmp_path / "out"
    assert "not a checkpoint folder" in _one_line_error(capsys, ["export", str(tmp_path), str(out)])
    assert "inside the checkpoint" in _one_line_error(capsys, ["export", str(run_dir), str(run_dir / "hub")])
    assert not (run_dir / "hub").exists()
    no_tokenizer = tmp_path / "bare"
    tiny_head("dense", "causal_lm").save_pretrained(str(no_tokenizer))
    assert "no tokenizer" in _one_line_error(capsys, ["export", str(no_tokenizer), str(out)])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert "not a decollapse architecture" in _one_line_error(capsys, ["export", str(foreign), str(out)])
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "not empty" in _one_line_error(capsys, ["export", str(run_dir), str(out)])
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_export_of_pickled_weights_is_refused_with_the_reason(tmp_path):
    folder = tmp_path / "pickled"
    model = tiny_head("dense", "causal_lm")
    model.save_pretrained(str(folder))
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ExportError, match="no safetensors weights.*pytorch_model.bin"):
        export_checkpoint(folder, tmp_path / "out")


def test_card_command_rebuilds_the_card_from_the_folder(exported, capsys):
    out = _entries(exported, "dense")["dense-trained"]["out"]
    before = (out / "README.md").read_text()
    (out / "README.md").unlink()
    assert main(["card", str(out), "--repo-id", "decollapse-tests/dense-trained"]) == 0
    assert (out / "README.md").read_text() == before


# ---------------------------------------------------------------------------------------------------
# Push: offline, through --dry-run; the upload path fails with one line when it cannot work
# ---------------------------------------------------------------------------------------------------


def test_push_dry_run_lists_files_and_validates_the_card(exported, capsys):
    out = _entries(exported, "moh")["moh-trained"]["out"]
    assert main(["push", str(out), "--repo-id", "someone/moh-small", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    size = (out / "model.safetensors").stat().st_size
    assert f"{size:>12,}  model.safetensors" in printed
    assert "README.md" in printed and "modeling_moh.py" in printed
    assert "dry run: nothing uploaded to someone/moh-small@main" in printed


@pytest.mark.parametrize("repo_id", ["no-namespace", "a/b/c", "user/bad name", "user/" + "x" * 100, "user/--x"])
def test_push_refuses_names_the_hub_would_refuse(exported, capsys, repo_id):
    out = _entries(exported, "dense")["dense-trained"]["out"]
    assert "--repo-id" in _one_line_error(capsys, ["push", str(out), "--repo-id", repo_id, "--dry-run"])


def test_push_refuses_a_folder_that_is_not_an_export(exported, capsys):
    run_dir = _entries(exported, "dense")["dense-trained"]["src"]
    assert "no auto_map" in _one_line_error(capsys, ["push", str(run_dir), "--repo-id", "someone/x", "--dry-run"])


def test_push_refuses_a_card_with_placeholders(exported, tmp_path, capsys):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(_entries(exported, "dense")["dense-trained"]["out"], folder)
    with open(folder / "README.md", "a") as fh:
        fh.write("\n[More Information Needed]\n")
    assert "README.md" in _one_line_error(capsys, ["push", str(folder), "--repo-id", "someone/x", "--dry-run"])


def test_push_without_a_token_fails_before_the_network(exported, monkeypatch, tmp_path, capsys):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    out = _entries(exported, "dense")["dense-trained"]["out"]
    assert "no Hugging Face token" in _one_line_error(capsys, ["push", str(out), "--repo-id", "someone/x"])


def test_push_without_network_fails_with_one_line(exported, monkeypatch, capsys):
    # The suite runs with HF_HUB_OFFLINE=1 (conftest), so the first request is refused offline.
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    out = _entries(exported, "dense")["dense-trained"]["out"]
    assert "unreachable" in _one_line_error(capsys, ["push", str(out), "--repo-id", "someone/x"])
