"""Text corpora as packed rows, one document per row, or a stream read per process.

The model-side contract (a packed row gives every document the logits it has alone) is in
tests/test_contracts.py for every architecture; here: the loader's rows, the collator's labels, the
loss a packed batch trains on, streaming, per-rank shards, and the command line around them."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from decollapse.data import DataCollatorForPackedLanguageModeling, load_text_corpus, stream_text_corpus
from decollapse.data.synthetic import SyntheticCorpusConfig, SyntheticLanguage

from .conftest import tiny_model

REPO = Path(__file__).resolve().parents[1]
BLOCK = 32


def _documents(count: int, seed: int = 0) -> list[str]:
    """Lines of the synthetic language, of varied length, each numbered so it can be told apart."""
    language = SyntheticLanguage(SyntheticCorpusConfig(num_train=50, num_validation=10, num_test=10, seq_len=48))
    rng = np.random.default_rng(seed)
    words = language.sample(count, rng, seq_len=48)["word_ids"]
    lengths = rng.integers(3, 40, size=count)
    return [f"doc{i} " + language.decode(row[1 : 1 + n]) for i, (row, n) in enumerate(zip(words, lengths))]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    docs = _documents(400)
    (root / "c.train.txt").write_text("\n".join(docs[:340]) + "\n", encoding="utf-8")
    (root / "c.valid.txt").write_text("\n".join(docs[340:370]) + "\n", encoding="utf-8")
    (root / "c.test.txt").write_text("\n".join(docs[370:]) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def corpora(folder):
    packed = load_text_corpus(str(folder), block_size=BLOCK, vocab_size=600)
    tokenizer = packed.tokenizer
    concat = load_text_corpus(str(folder), block_size=BLOCK, tokenizer=tokenizer, packing="concat")
    single = load_text_corpus(str(folder), block_size=BLOCK, tokenizer=tokenizer, packing="none")
    return packed, concat, single


def test_packed_rows_restart_position_ids_at_every_document(corpora):
    packed, concat, _ = corpora
    eos = packed.tokenizer.eos_token_id
    assert packed.dataset["train"]["input_ids"] == concat.dataset["train"]["input_ids"]  # the same blocks
    assert "position_ids" not in concat.dataset["train"].column_names
    restarts = 0
    for ids, positions in zip(packed.dataset["train"]["input_ids"], packed.dataset["train"]["position_ids"]):
        assert len(ids) == len(positions) == BLOCK and positions[0] == 0
        for t in range(1, BLOCK):
            # A new document starts right after an end token, and nowhere else.
            expected = 0 if ids[t - 1] == eos else positions[t - 1] + 1
            assert positions[t] == expected
            restarts += expected == 0
    assert restarts > 100


def test_unpacked_rows_hold_one_document_each(corpora):
    _, _, single = corpora
    eos = single.tokenizer.eos_token_id
    rows = single.dataset["train"]["input_ids"]
    assert max(len(r) for r in rows) <= BLOCK and min(len(r) for r in rows) >= 2
    assert all(eos not in r[:-1] for r in rows)  # an end token only closes the row's own document
    whole = sum(r[-1] == eos for r in rows)
    assert whole >= 300  # most documents fit one row; the rest are cut into chunks of BLOCK
    assert single.num_tokens["train"] == sum(len(r) for r in rows)


def test_causal_collator_does_not_score_a_document_on_the_one_before(corpora):
    packed, _, _ = corpora
    rows = [packed.dataset["train"][i] for i in range(4)]
    causal = DataCollatorForPackedLanguageModeling(packed.tokenizer, mlm=False)(rows)
    positions = causal["position_ids"]
    starts = positions == 0
    starts[:, 0] = False
    assert starts.any()
    assert (causal["labels"][starts] == -100).all()
    assert torch.equal(causal["labels"][~starts], causal["input_ids"][~starts])
    masked = DataCollatorForPackedLanguageModeling(packed.tokenizer, mlm=True, seed=0)(rows)
    labelled = masked["labels"] != -100
    assert labelled.any() and torch.equal(masked["labels"][labelled], causal["input_ids"][labelled])


@pytest.mark.parametrize("arch", ["dense", "some"])
def test_a_packed_batch_trains_on_the_loss_of_its_documents_alone(corpora, arch):
    """The loss of a packed batch (collator + model) is the token-weighted mean of each document's own
    next-token loss: nothing of one document reaches another, in the inputs or the targets."""
    packed, _, _ = corpora
    model = tiny_model(arch, vocab_size=len(packed.tokenizer), max_position_embeddings=BLOCK).eval()
    for name in model.config.aux_loss_weight_fields.values():
        setattr(model.config, name, 0.0)
    rows = [packed.dataset["train"][i] for i in range(3)]
    batch = DataCollatorForPackedLanguageModeling(packed.tokenizer, mlm=False)(rows)
    loss = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"]).loss
    total, count = 0.0, 0
    for ids, positions in zip(batch["input_ids"], batch["position_ids"]):
        bounds = [t for t in range(BLOCK) if positions[t] == 0] + [BLOCK]
        for lo, hi in zip(bounds, bounds[1:]):
            if hi - lo < 2:
                continue
            doc = ids[lo:hi].unsqueeze(0)
            total += model(input_ids=doc, labels=doc).loss.item() * (hi - lo - 1)
            count += hi - lo - 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_a_stream_gives_the_rows_of_the_in_memory_corpus(folder, corpora):
    packed, _, _ = corpora
    stream = stream_text_corpus(str(folder), block_size=BLOCK, tokenizer=packed.tokenizer, held_out_rows=5)
    assert stream.streaming and stream.summary()["num_blocks"] == {"validation": 5, "test": 5}
    for split in ("validation", "test"):
        assert stream.dataset[split][:]["input_ids"] == packed.dataset[split][:5]["input_ids"]
        assert stream.dataset[split][:]["position_ids"] == packed.dataset[split][:5]["position_ids"]
    rows = list(stream.dataset["train"].take(20))
    assert all(len(r["input_ids"]) == BLOCK and r["position_ids"][0] == 0 for r in rows)


def test_each_rank_reads_its_own_documents_of_the_stream(tmp_path, corpora):
    """Two ranks (split_dataset_by_node) train on disjoint documents that together are the whole train
    split; held-out rows are the same on both. One document per row makes documents countable. (With
    one file, each rank reads the stream and keeps every other row.)"""
    packed, _, _ = corpora
    path = tmp_path / "one-file.txt"
    path.write_text("\n".join(_documents(300, seed=5)) + "\n", encoding="utf-8")
    options = dict(block_size=4 * BLOCK, tokenizer=packed.tokenizer, packing="none", held_out_rows=1000)

    def documents(corpus):
        return {packed.tokenizer.decode(r["input_ids"]).split()[0] for r in corpus.dataset["train"]}

    whole = stream_text_corpus(str(path), **options)
    ranks = [stream_text_corpus(str(path), **options, rank=r, world_size=2) for r in (0, 1)]
    seen = [documents(corpus) for corpus in ranks]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[0] | seen[1] == documents(whole)
    assert ranks[0].dataset["validation"][:] == ranks[1].dataset["validation"][:] == whole.dataset["validation"][:]
    # A file without held-out splits gives each 5% of its documents, by a hash of the text.
    held_out = {packed.tokenizer.decode(r).split()[0] for r in whole.dataset["validation"]["input_ids"]}
    assert held_out and not held_out & documents(whole) and len(held_out) < 0.15 * 300


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------


def _train(argv, tmp_path, capsys):
    from decollapse.cli import main

    os.chdir(tmp_path)
    code = main(["train", *argv, "--no-progress"])
    return code, capsys.readouterr()


def test_text_runs_pack_documents_for_models_that_keep_them_apart(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny = ["--set", "block_size=32", "eval_steps=100", "monitor_every=100", "hidden_size=32"]
    code, _ = _train(["dense", "--dataset", str(folder), "--max-steps", "3", "--output-dir", "d", *tiny], tmp_path, capsys)
    assert code == 0
    assert json.loads((tmp_path / "d" / "metrics.json").read_text())["recipe"]["packing"] == "documents"
    concept = ["--set", "block_size=32", "eval_steps=100", "monitor_every=100", "objective=masked_lm"]
    code, _ = _train(["concept", "--dataset", str(folder), "--max-steps", "3", "--output-dir", "c", *concept],
                     tmp_path, capsys)
    assert code == 0
    metrics = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert metrics["recipe"]["packing"] == "none" and metrics["train_tokens"] < 3 * 4 * 32  # padding not counted


@pytest.mark.parametrize(
    "argv,message",
    [
        (["concept", "--dataset", "{folder}", "--set", "packing=documents"], "cannot keep packed documents apart"),
        (["dense", "--dataset", "{folder}", "--streaming"], "--streaming needs --max-steps"),
        (["dense", "--streaming", "--max-steps", "3"], "for a text --dataset only"),
        (["dense", "--dataset", "{folder}", "--set", "packing=tight"], "packing=tight: expected one of"),
        (["dense", "--dataset", "{folder}", "--set", "vocab_size=600"], "the tokenizer of the data decides it"),
    ],
)
def test_bad_packing_and_streaming_requests_fail_in_one_line(folder, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("{folder}", str(folder)) for a in argv]
    code, out = _train([*argv, "--output-dir", "x"], tmp_path, capsys)
    assert code == 2
    assert message in out.err and len(out.err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_stream_their_own_shards(folder, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "decollapse", "train", "dense", "--dataset", str(folder), "--streaming",
               "--max-steps", "4", "--no-progress", "--output-dir", "two", "--set", "block_size=32",
               "batch_size=2", "eval_steps=100", "monitor_every=100", "streaming_held_out_rows=8", "hidden_size=32"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["streaming"] and metrics["world_size"] == 2
    assert metrics["train_tokens"] == 4 * 2 * 2 * 32  # every rank read full packed rows of its own


def test_a_local_corpus_is_tokenised_once_and_read_back_from_the_cache(tmp_path, monkeypatch):
    import decollapse.data.text as text

    monkeypatch.setenv("DECOLLAPSE_TEXT_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "corpus.txt"
    source.write_text("\n".join(_documents(200, seed=7)) + "\n", encoding="utf-8")
    first = load_text_corpus(str(source), block_size=BLOCK, vocab_size=500)
    assert len(list((tmp_path / "cache").iterdir())) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("a cached corpus is not tokenised again")

    monkeypatch.setattr(text, "train_bpe_tokenizer", no_training)
    again = load_text_corpus(str(source), block_size=BLOCK, vocab_size=500)
    for split in ("train", "validation", "test"):
        assert again.dataset[split][:] == first.dataset[split][:]
    assert again.tokenizer.get_vocab() == first.tokenizer.get_vocab()
    assert (again.tokenizer.pad_token_id, again.tokenizer.eos_token_id) == (first.tokenizer.pad_token_id,
                                                                           first.tokenizer.eos_token_id)
    assert again.num_tokens == first.num_tokens and again.summary() == first.summary()
    # Another setting, or a changed file, is another entry: never a stale one.
    with pytest.raises(AssertionError, match="not tokenised again"):
        load_text_corpus(str(source), block_size=BLOCK, vocab_size=500, packing="none")
    source.write_text("\n".join(_documents(210, seed=8)) + "\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="not tokenised again"):
        load_text_corpus(str(source), block_size=BLOCK, vocab_size=500)


def test_a_hub_id_streams_through_load_dataset_with_streaming(monkeypatch, corpora):
    """No network in tests: a stand-in for the Hub answers load_dataset(..., streaming=True) with an
    IterableDatasetDict whose text column has another name and whose held-out split is 'valid'."""
    import datasets

    packed, _, _ = corpora
    docs = _documents(300, seed=9)
    calls = []

    def split(lines):
        return datasets.IterableDataset.from_generator(lambda: ({"id": i, "body": t} for i, t in enumerate(lines)),
                                                       features=datasets.Features({"id": datasets.Value("int64"),
                                                                                   "body": datasets.Value("string")}))

    def fake_load_dataset(path, name=None, streaming=False):
        calls.append((path, name, streaming))
        return datasets.IterableDatasetDict({"train": split(docs[:260]), "valid": split(docs[260:])})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    corpus = stream_text_corpus("someone/big-corpus", hub_config="en", block_size=BLOCK, tokenizer=packed.tokenizer,
                                held_out_rows=3)
    assert calls == [("someone/big-corpus", "en", True)]
    assert len(corpus.dataset["validation"]) == 3 and len(corpus.dataset["test"]) >= 1
    first = packed.tokenizer.decode(corpus.dataset["validation"][0]["input_ids"]).split()[0]
    assert first == "doc260"  # validation is the source's own 'valid' split, read from its start
    held_out = {packed.tokenizer.decode(r).split()[0] for r in corpus.dataset["test"]["input_ids"]}
    assert all(int(d[3:]) < 260 for d in held_out if d.startswith("doc"))  # test carved from train by hash
    assert next(iter(corpus.dataset["train"]))["input_ids"]


def test_a_stream_split_by_node_is_read_by_a_plain_loader_not_split_again(folder, corpora):
    """accelerator.prepare would divide a stream that split_dataset_by_node already divided (or have rank 0
    read for everyone); DecollapseTrainer gives such a stream a plain DataLoader over this rank's part."""
    from types import SimpleNamespace

    from decollapse.trainers import DecollapseTrainer

    packed, _, _ = corpora
    part = stream_text_corpus(str(folder), block_size=BLOCK, tokenizer=packed.tokenizer, held_out_rows=2,
                              rank=1, world_size=2).dataset["train"]
    collator = DataCollatorForPackedLanguageModeling(packed.tokenizer, mlm=False)
    trainer = SimpleNamespace(
        train_dataset=part, _train_batch_size=3, data_collator=collator,
        args=SimpleNamespace(world_size=2, dataloader_num_workers=0, dataloader_pin_memory=False),
        _get_collator_with_removed_columns=lambda c, description: c,
    )
    loader = DecollapseTrainer.get_train_dataloader(trainer)
    assert type(loader) is torch.utils.data.DataLoader and loader.dataset is part
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (3, BLOCK) and "position_ids" in batch
    rows = [r["input_ids"] for r in itertools.islice(iter(part), 3)]
    assert batch["input_ids"].tolist() == rows  # this rank's own rows, in its own order


@pytest.mark.parametrize("bad,message", [({"block_size": 0}, "block_size=0"), ({"packing": "tight"}, "packing='tight'"),
                                         ({"vocab_size": 10}, "vocab_size=10")])
def test_both_loaders_refuse_the_same_bad_options(folder, bad, message):
    for load in (load_text_corpus, stream_text_corpus):
        with pytest.raises(ValueError, match=message):
            load(str(folder), **{"block_size": BLOCK, **bad})
