import logging
import os
import tempfile
from pathlib import Path

import pytest
import torch

# Tests never reach the Hub; anything that tries fails loudly instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tokenised local corpora are cached; tests keep theirs out of the user's cache.
os.environ.setdefault("DECOLLAPSE_TEXT_CACHE", tempfile.mkdtemp(prefix="decollapse-text-cache-"))

import decollapse  # noqa: E402,F401  (registers the architectures)
from decollapse.registry import ARCHITECTURES  # noqa: E402

# Prepended to the scripts that run in a fresh Python: there `import decollapse` fails, as for a Hub
# user who never installed it, so anything loaded must come from the folder's own remote code.
BLOCK_DECOLLAPSE = r'''
import importlib.abc, sys

class BlockDecollapse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "decollapse" or name.startswith("decollapse."):
            raise ImportError("decollapse is blocked in this process")

sys.meta_path.insert(0, BlockDecollapse())
'''

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# The shared tiny shape; each architecture adds what it needs in its registration (`tiny=`).
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "max_position_embeddings": 32, "vocab_size": 61}


def tiny_config(arch_name: str, **overrides):
    arch = ARCHITECTURES[arch_name]
    return arch.config_class(**{**TINY, **arch.tiny, **overrides})


def tiny_model(arch_name: str, objective: str | None = None, **overrides):
    """A tiny model of the architecture's head for ``objective`` (default: its first objective)."""
    torch.manual_seed(0)
    objective = objective or ARCHITECTURES[arch_name].objectives[0]
    config = tiny_config(arch_name, objective=objective, **overrides)
    return ARCHITECTURES[arch_name].model_for_objective(objective)(config)


class _DeprecationLog(logging.Handler):
    """Collects the deprecations the Hugging Face libraries *log* (transformers renames such as
    ``past_key_values`` -> ``cache`` are announced with ``logger.warning_once``, which pytest's
    warning filters never see)."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if "deprecat" in message.lower():
            self.records.append(f"{record.name}: {message}")


_DEPRECATIONS = _DeprecationLog()
for _name in ("transformers", "accelerate", "datasets", "peft", "sentence_transformers", "huggingface_hub"):
    logging.getLogger(_name).addHandler(_DEPRECATIONS)


@pytest.fixture(autouse=True)
def no_logged_deprecation():
    """Fails a test during which a Hugging Face library logged a deprecation."""
    _DEPRECATIONS.records.clear()
    yield
    if _DEPRECATIONS.records:
        pytest.fail("deprecation logged by a dependency: " + " | ".join(_DEPRECATIONS.records))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("shared/data is not beside the checkout")
    return SHARED_DATA
