"""The registry: one place per architecture, imports that point down, and an architecture that
reuses a sibling's block moving in (and out to the Hub) by itself."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from decollapse.registry import (
    ARCHITECTURES,
    RegistrationError,
    register_architecture,
    register_with_auto_classes,
    unregister_architecture,
)
from decollapse.remote_code import bundle_sources, write_remote_code

from .conftest import BLOCK_DECOLLAPSE, TINY, tiny_model

PACKAGE = Path(__file__).resolve().parents[1] / "decollapse"
FACTS = dict(
    config="DenseConfig",
    models={"AutoModel": "DenseModel"},
    summary="a probe",
    citations=("Somebody 2024, a paper.",),
    limitations="It does nothing useful.",
)


# -- registration -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "missing,message",
    [
        ({"citations": ()}, "citation"),
        ({"citations": ("",)}, "citation"),
        ({"limitations": ""}, "limitations"),
        ({"limitations": "   "}, "limitations"),
        ({"summary": ""}, "summary"),
        ({"models": {"AutoModelForCausalLM": "DenseForCausalLM"}}, "AutoModel"),
        ({"models": {"AutoModel": "DenseModel", "AutoModelForTypo": "X"}}, "AutoModelForTypo"),
    ],
)
def test_an_incomplete_registration_fails_when_it_registers(missing, message):
    with pytest.raises(RegistrationError, match=message):
        register_architecture(name="probe_incomplete", **{**FACTS, **missing})
    assert "probe_incomplete" not in ARCHITECTURES


def test_a_name_registers_once():
    with pytest.raises(RegistrationError, match="already registered"):
        register_architecture(name="dense", **FACTS)
    assert ARCHITECTURES["dense"].summary != "a probe"


def test_every_architecture_is_discovered_from_its_own_registration_file():
    files = {p.stem for p in (PACKAGE / "architectures").glob("*.py") if not p.stem.startswith("_")}
    assert files == set(ARCHITECTURES)
    for name in ARCHITECTURES:
        assert (PACKAGE / "configuration" / f"{name}.py").is_file()
        assert (PACKAGE / "modeling" / f"{name}.py").is_file()
        assert (Path(__file__).parent / f"test_{name}.py").is_file(), f"{name} has no test file"


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_declared_ddp_unused_parameters_match_a_real_step(arch):
    """DDP needs ``find_unused_parameters`` exactly when a step can leave a trainable parameter without
    a gradient; the registration says which, and a real training step on every head checks it."""
    declared = ARCHITECTURES[arch].ddp_find_unused_parameters
    unused = set()
    for objective in ARCHITECTURES[arch].objectives:
        if objective not in ("causal_lm", "masked_lm"):
            continue  # extra heads take other inputs; their encoder is the same
        model = tiny_model(arch, objective=objective).train()
        ids = torch.randint(3, model.config.vocab_size, (2, 16))
        labels = ids.clone()
        if objective == "masked_lm":
            labels[:, ::2] = -100
        model(input_ids=ids, labels=labels).loss.backward()
        unused |= {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    if declared:
        assert unused, f"{arch} declares unused parameters but every parameter got a gradient"
    else:
        assert not unused, f"{arch}: no gradient for {sorted(unused)[:3]}; declare ddp_find_unused_parameters"


# -- imports point down ----------------------------------------------------------------------------------


def test_import_decollapse_loads_no_hub_card_or_push_code():
    code = "import sys, decollapse; print(sorted(m for m in sys.modules if m.startswith('decollapse')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(ast.literal_eval(out))
    assert "decollapse.registry" in loaded
    assert not {m for m in loaded if m.startswith(("decollapse.hub_cards", "decollapse.runner", "decollapse.cli"))}
    assert "huggingface_hub.repocard" not in out


@pytest.mark.parametrize("module", ["registry.py", "remote_code.py", *[f"architectures/{a}.py" for a in ARCHITECTURES]])
def test_the_core_imports_nothing_above_it(module):
    """The registry, the bundler and the registrations import no Hub, runner, CLI or eval code, so a
    change up there can never make the models unimportable."""
    upward = ("hub_cards", "runner", "cli", "eval_suites", "trainers", "ablation", "reporting", "diagnose", "sweep")
    tree = ast.parse((PACKAGE / module).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            target = (node.module or "").split(".")[0]
            assert target not in upward, f"{module} imports {'.' * node.level}{node.module}"


# -- an architecture that reuses a sibling's block ----------------------------------------------------

REUSE_CONFIG = '''
"""Test-only: MoH attention with the dense control's MLP."""

from .moh import MoHConfig


class ReuseConfig(MoHConfig):
    model_type = "decollapse_reuse_probe"
'''

REUSE_MODELING = '''
"""Test-only: a block made of a sibling's attention (moh) and another sibling's MLP (dense)."""

from torch import nn
from transformers import GenerationMixin

from ..configuration.reuse import ReuseConfig
from .common import CausalLMHeadMixin
from .dense import DenseMLP
from .moh import MoHBlock, MoHModel, MoHPreTrainedModel


class ReuseBlock(MoHBlock):
    """moh's block (its routed attention) with the dense control's MLP."""

    def __init__(self, config: ReuseConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.mlp = DenseMLP(config)


class ReusePreTrainedModel(MoHPreTrainedModel):
    config_class = ReuseConfig


class ReuseModel(MoHModel):
    config_class = ReuseConfig

    def __init__(self, config: ReuseConfig):
        super().__init__(config)
        self.layers = nn.ModuleList([ReuseBlock(config, i) for i in range(config.num_hidden_layers)])
        self.post_init()


class ReuseForCausalLM(CausalLMHeadMixin, ReusePreTrainedModel, GenerationMixin):
    def __init__(self, config: ReuseConfig):
        super().__init__(config)
        self.model = ReuseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
'''

FRESH_LOAD = BLOCK_DECOLLAPSE + r'''
import json
import torch
from transformers import AutoModelForCausalLM
folder, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(input_ids=ids).logits
torch.save({"logits": logits, "class": type(model).__module__}, sys.argv[3])
'''


@pytest.fixture(scope="module")
def reuse_architecture(tmp_path_factory):
    """A package laid out like decollapse (its configuration/ and modeling/ folders copied) plus a new
    architecture's two files, registered with one call, as a new architecture would be."""
    root = tmp_path_factory.mktemp("src") / "reuseprobe"
    for folder in ("configuration", "modeling"):
        shutil.copytree(PACKAGE / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "__init__.py").write_text("")
    (root / "configuration" / "reuse.py").write_text(REUSE_CONFIG)
    (root / "modeling" / "reuse.py").write_text(REUSE_MODELING)
    sys.path.insert(0, str(root.parent))
    arch = register_architecture(
        name="reuse",
        config="ReuseConfig",
        models={"AutoModel": "ReuseModel", "AutoModelForCausalLM": "ReuseForCausalLM"},
        summary="test-only: moh attention with dense's MLP",
        citations=("This test.",),
        limitations="It exists only in this test.",
        tiny=ARCHITECTURES["moh"].tiny,
        package="reuseprobe",
    )
    register_with_auto_classes(arch)
    try:
        yield arch
    finally:
        unregister_architecture("reuse")
        sys.path.remove(str(root.parent))


def test_an_architecture_reusing_sibling_blocks_exports_and_loads_without_decollapse(reuse_architecture, tmp_path):
    arch = reuse_architecture
    files = bundle_sources(arch)
    # Its own files, both siblings it reuses (and their configurations), the shared helpers; nothing else.
    assert {"configuration_reuse.py", "modeling_reuse.py", "modeling_moh.py", "modeling_dense.py",
            "configuration_moh.py", "configuration_dense.py", "common.py", "outputs.py"} <= set(files)
    assert not {"modeling_dawn.py", "modeling_concept.py"} & set(files)
    modeling = files["modeling_reuse.py"]
    assert "from .configuration_reuse import ReuseConfig" in modeling
    assert "from .modeling_moh import MoHBlock" in modeling and "from .modeling_dense import DenseMLP" in modeling
    assert "from .configuration_moh import MoHConfig" in files["configuration_reuse.py"]
    for name, text in files.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and f"{node.module}.py" in files, f"{name}: from .{node.module}"

    config = arch.config_class(**{**TINY, **arch.tiny})
    torch.manual_seed(0)
    model = arch.model_class("AutoModelForCausalLM")(config).eval()
    folder = tmp_path / "export"
    model.save_pretrained(folder)
    write_remote_code(arch, folder)
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == (
        "modeling_reuse.ReuseForCausalLM"
    )
    ids = [[5, 9, 12, 7, 30, 8], [14, 5, 5, 20, 9, 13]]
    result = tmp_path / "logits.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    subprocess.run(
        [sys.executable, "-c", FRESH_LOAD, str(folder), json.dumps(ids), str(result)],
        check=True, env=env, cwd=tmp_path, capture_output=True, text=True,
    )
    loaded = torch.load(result)
    assert loaded["class"].startswith("transformers_modules"), "loaded from the folder's own code"
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(ids)).logits
    assert torch.equal(loaded["logits"], expected)


def test_a_reused_architecture_is_served_by_the_auto_classes(reuse_architecture):
    """Its two files and one registration call are all it took: the Auto classes, the registry's
    heads and the tiny test shape serve it without any other file edited."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = reuse_architecture
    assert arch.objectives == ["causal_lm"]
    config = AutoConfig.for_model("decollapse_reuse_probe", **{**TINY, **arch.tiny})
    assert type(config) is arch.config_class
    model = AutoModelForCausalLM.from_config(config)
    assert type(model) is arch.model_for_objective("causal_lm")
    assert isinstance(model.model.layers[0].mlp, sys.modules["reuseprobe.modeling.dense"].DenseMLP)
