"""Training on several processes (torchrun, 2 CPU processes over gloo): the same numbers as one process
at the same global batch, written once, with every process's tokens counted."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from decollapse.registry import ARCHITECTURES

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = ["corpus.num_train=48", "corpus.num_validation=8", "corpus.num_test=8", "corpus.seq_len=24",
            "eval_steps=100", "logging_steps=1", "monitor_every=3"]
STEPS = 6
# Where two processes of b rows cannot match one of 2b rows exactly, and why:
TOLERANCE = {
    # Its block regularisers are statistics of each process's own batch (as BatchNorm's are without
    # synchronisation), so b rows per process estimate them differently from 2b rows.
    "sosm": 0.02,
    # A masked LM: each process masks its own rows with its own seeded stream (seed + rank), so the
    # two layouts train on different masks (step 1 included) and agree only to the noise of masking.
    "concept": 0.05,
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(command, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(name, None)
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_two_processes_train_as_one_at_the_same_global_batch_and_rank0_alone_writes(tmp_path, arch):
    train = ["-m", "decollapse", "train", arch, "--max-steps", str(STEPS), "--no-progress", "--set", *TINY_RUN]
    one = _run([sys.executable, *train, "batch_size=4", "--output-dir", "one"], tmp_path)
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_free_port()), *train, "batch_size=2", "--output-dir", "two"], tmp_path)
    assert one.count("wrote ") == 1 and two.count("wrote ") == 1, two
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no partial or checkpoint folders

    metrics = {name: json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "two")}
    assert metrics["two"]["world_size"] == 2 and metrics["one"]["world_size"] == 1
    assert metrics["two"]["train_tokens"] == metrics["one"]["train_tokens"] == STEPS * 4 * 24

    logs = {name: [e for e in json.loads((tmp_path / name / "training_log.json").read_text()) if "loss" in e]
            for name in ("one", "two")}
    assert len(logs["one"]) == len(logs["two"]) == STEPS
    # Step 1 starts from the same weights on the same global batch: its task loss (each term is
    # averaged over the processes before it is logged) is the one-process value.
    first = [logs[name][0]["task_loss"] for name in ("one", "two")]
    if "causal_lm" in ARCHITECTURES[arch].objectives:  # a masked LM's layouts mask differently from step 1
        assert first[1] == pytest.approx(first[0], rel=1e-5)
    curves = {name: [e["loss"] for e in logs[name]] for name in ("one", "two")}
    assert curves["two"] == pytest.approx(curves["one"], rel=TOLERANCE.get(arch, 2e-4))
    if arch not in TOLERANCE:
        # DDP's averaged gradient is the one-process gradient: the weights agree at the end too.
        weights = {name: load_file(str(tmp_path / name / "model.safetensors")) for name in ("one", "two")}
        for key, value in weights["one"].items():
            assert (weights["two"][key].double() - value.double()).abs().max() < 1e-3, key


def test_a_cpu_accelerate_launch_that_would_start_one_process_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from decollapse.cli import main

    # What `accelerate launch --cpu --num_processes 2` leaves a single process: MASTER_ADDR, no WORLD_SIZE.
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", "dense", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "accelerate launch --multi_gpu --num_processes N" in err
    assert list(tmp_path.iterdir()) == []


EXAMPLES = REPO / "examples" / "accelerate"


def test_the_example_accelerate_configs_are_valid_and_say_what_they_shard():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {path.stem: load_config_from_file(str(path)) for path in sorted(EXAMPLES.glob("*.yaml"))}
    assert sorted(configs) == ["ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"]
    assert configs["ddp"].distributed_type.value == "MULTI_GPU"
    fsdp = configs["fsdp"]
    assert fsdp.distributed_type.value == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2
    # Wrapping follows each architecture's _no_split_modules, so the file names no layer class.
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp.fsdp_config
    # A run's output folder is a from_pretrained checkpoint: sharded engines must save full weights.
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert configs["deepspeed_zero3"].deepspeed_config["zero3_save_16bit_model"] is True
    assert [configs[f"deepspeed_zero{s}"].deepspeed_config["zero_stage"] for s in (2, 3)] == [2, 3]


@pytest.mark.parametrize("flag,engine", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_a_sharding_launch_on_a_cpu_is_refused_rather_than_run_as_ddp(tmp_path, monkeypatch, capsys, flag, engine):
    """accelerate shards only on accelerators: on a CPU the FSDP config trains plain DDP without a word."""
    import torch

    from decollapse.cli import main

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the sharded engines")
    monkeypatch.setenv(flag, "true")
    assert main(["train", "dense", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"asks for {engine}, which accelerate runs on GPUs only" in err
    assert list(tmp_path.iterdir()) == []


def test_zero3_marks_each_architectures_blocks_and_routed_units_as_leaf_modules(monkeypatch):
    """Without DeepSpeed here, a stand-in records the call that DecollapseTrainer makes under ZeRO-3."""
    import types

    import transformers.integrations.deepspeed as hf_deepspeed

    from decollapse.trainers.trainer import mark_zero3_leaf_modules

    from .conftest import tiny_model

    assert mark_zero3_leaf_modules(tiny_model("some")) == []  # not under ZeRO-3: nothing to do
    calls = []
    fake = types.ModuleType("deepspeed")
    fake.utils = types.SimpleNamespace(set_z3_leaf_modules=lambda model, classes: calls.append(classes))
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    monkeypatch.setitem(sys.modules, "deepspeed.utils", fake.utils)
    monkeypatch.setattr(hf_deepspeed, "is_deepspeed_zero3_enabled", lambda: True)
    for arch in ARCHITECTURES:
        model = tiny_model(arch)
        marked = mark_zero3_leaf_modules(model)
        assert marked and calls[-1] == marked
        # The classes the model declares and holds (a tiny SOSM has no context layers).
        assert {c.__name__ for c in marked} <= set(model._no_split_modules), arch
    some = {c.__name__ for c in mark_zero3_leaf_modules(tiny_model("some"))}
    assert some == {"SomeBlock", "SomeExperts"}  # the routed, frozen expert library is a unit of its own


@pytest.mark.slow
def test_the_example_ddp_config_launches_two_processes_through_accelerate(tmp_path):
    train = ["-m", "decollapse", "train", "dense", "--max-steps", str(STEPS), "--no-progress", "--set", *TINY_RUN]
    one = _run([sys.executable, *train, "batch_size=4", "--output-dir", "one"], tmp_path)
    two = _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(EXAMPLES / "ddp.yaml"),
                "--main_process_port", str(_free_port()), *train, "batch_size=2", "--output-dir", "two"], tmp_path)
    assert one.count("wrote ") == 1 and two.count("wrote ") == 1
    metrics = {name: json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "two")}
    assert (metrics["two"]["engine"], metrics["two"]["world_size"]) == ("ddp", 2)
    assert metrics["one"]["engine"] == "single"
    curves = {name: [e["loss"] for e in json.loads((tmp_path / name / "training_log.json").read_text()) if "loss" in e]
              for name in ("one", "two")}
    assert curves["two"] == pytest.approx(curves["one"], rel=2e-4)
