"""Mixed precision: every architecture trains in bfloat16 autocast on a CPU without a non-finite loss,
its matmuls really run in bfloat16, and what it saves stays float32."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from decollapse.cli import main
from decollapse.registry import ARCHITECTURES

TINY_RUN = ["corpus.num_train=48", "corpus.num_validation=8", "corpus.num_test=8", "corpus.seq_len=24",
            "eval_steps=100", "logging_steps=1", "monitor_every=100"]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_bf16_training_runs_in_bf16_and_stays_finite(tmp_path, monkeypatch, arch):
    seen = set()
    forward = torch.nn.Linear.forward

    def recording(self, x):
        out = forward(self, x)
        if torch.is_grad_enabled():  # training forwards only
            seen.add(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Linear, "forward", recording)
    out = tmp_path / "run"
    assert main(["train", arch, "--max-steps", "4", "--output-dir", str(out), "--no-progress",
                 "--set", *TINY_RUN, "bf16=true"]) == 0
    assert torch.bfloat16 in seen
    losses = [e["loss"] for e in json.loads((out / "training_log.json").read_text()) if "loss" in e]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} <= {"F32", "I64"}


def test_fp16_without_cuda_and_two_precisions_are_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed on CUDA")
    for settings, message in ((["fp16=true"], "--set fp16=true: float16 training needs a CUDA device"),
                              (["bf16=true", "fp16=true"], "choose one mixed precision")):
        assert main(["train", "dense", "--output-dir", str(tmp_path / "run"), "--set", *settings]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
        assert list(tmp_path.iterdir()) == []


def test_the_gpu_check_skips_each_part_in_one_line_on_a_cpu(tmp_path, capsys, monkeypatch):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "gpu_check", Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    )
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check.main(["--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [*ARCHITECTURES, "moh head skipping (flex_attention)"]
    assert all("skipped bf16 training and throughput and sharded (FSDP, ZeRO-3) training: no CUDA device here" in line
               for line in lines[:-1])
    assert "skipped: no CUDA device here" in lines[-1]
    assert not (tmp_path / "out").exists()
    assert check.main(["--archs", "dense,gpt5"]) == 2
    assert "--archs: unknown gpt5" in capsys.readouterr().err
