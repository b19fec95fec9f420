import os
from pathlib import Path

import pytest
import torch

# Tests never reach the Hub; anything that tries fails loudly instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import decollapse  # noqa: E402,F401  (registers the architectures)
from decollapse.registry import ARCHITECTURES  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Tiny settings per architecture for contract tests; an architecture added later adds its line here
# only if the generic defaults below do not fit it.
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "max_position_embeddings": 32, "vocab_size": 61}
TINY_OVERRIDES: dict[str, dict] = {
    "dense": {"num_attention_heads": 4},
    "concept": {"num_concepts": 8, "num_attention_heads": 4, "intermediate_size": 32},
    "dawn": {"num_neurons": 32, "neuron_top_k": 4, "num_basis": 8, "basis_rank": 4, "modulation_rank": 8},
    "moh": {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8},
}


def tiny_config(arch_name: str, **overrides):
    arch = ARCHITECTURES[arch_name]
    return arch.config_class(**{**TINY, **TINY_OVERRIDES.get(arch_name, {}), **overrides})


def tiny_model(arch_name: str, objective: str | None = None, **overrides):
    """A tiny model of the architecture's head for ``objective`` (default: its first objective)."""
    torch.manual_seed(0)
    objective = objective or ARCHITECTURES[arch_name].objectives[0]
    config = tiny_config(arch_name, objective=objective, **overrides)
    return ARCHITECTURES[arch_name].model_for_objective(objective)(config)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("shared/data is not beside the checkout")
    return SHARED_DATA
