"""The architecture registry: one line per architecture.

Adding an architecture = ``configuration/<name>.py`` + ``modeling/<name>.py`` + ``tests/test_<name>.py``
+ one ``Architecture(...)`` line below. Registration with the Auto classes, the CLI, ``decollapse list``
and the parametrized contract tests (causality, save/load, export) all read this table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

# The Auto class that serves each objective's head.
OBJECTIVE_AUTO_CLASSES = {"causal_lm": "AutoModelForCausalLM", "masked_lm": "AutoModelForMaskedLM"}
_AUTO = {
    "AutoModel": AutoModel,
    "AutoModelForCausalLM": AutoModelForCausalLM,
    "AutoModelForMaskedLM": AutoModelForMaskedLM,
    "AutoModelForSequenceClassification": AutoModelForSequenceClassification,
}


@dataclass(frozen=True)
class Architecture:
    name: str
    config: str
    models: dict[str, str] = field(default_factory=dict)  # Auto class name -> model class name
    summary: str = ""
    # Pre-training objectives with no transformers Auto class (TSDAE, diffusion): objective -> class.
    extra_heads: dict[str, str] = field(default_factory=dict)

    @property
    def config_class(self):
        return getattr(importlib.import_module(f"decollapse.configuration.{self.name}"), self.config)

    def model_class(self, auto_name: str):
        return self._class(self.models[auto_name])

    def _class(self, class_name: str):
        return getattr(importlib.import_module(f"decollapse.modeling.{self.name}"), class_name)

    def class_named(self, class_name: str):
        """One of this architecture's model classes by name (an Auto-served head or an extra head)."""
        if class_name not in set(self.models.values()) | set(self.extra_heads.values()):
            raise ValueError(f"architecture {self.name!r} has no model class {class_name!r}")
        return self._class(class_name)

    def model_for_objective(self, objective: str):
        if objective in self.extra_heads:
            return self._class(self.extra_heads[objective])
        auto_name = OBJECTIVE_AUTO_CLASSES.get(objective)
        if auto_name not in self.models:
            raise ValueError(f"architecture {self.name!r} has no {objective} head")
        return self.model_class(auto_name)

    @property
    def objectives(self) -> list[str]:
        auto = [obj for obj, name in OBJECTIVE_AUTO_CLASSES.items() if name in self.models]
        return auto + list(self.extra_heads)


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in [
        Architecture("dense", "DenseConfig", {"AutoModel": "DenseModel", "AutoModelForCausalLM": "DenseForCausalLM", "AutoModelForMaskedLM": "DenseForMaskedLM"}, "plain pre-LN transformer: the control arm"),  # noqa: E501
        Architecture("concept", "ConceptEncoderConfig", {"AutoModel": "ConceptEncoderModel", "AutoModelForMaskedLM": "ConceptEncoderForMaskedLM", "AutoModelForSequenceClassification": "ConceptEncoderForSequenceClassification"}, "C concept vectors read the sequence by cross-attention: a Perceiver bottleneck (MrCogito)", {"tsdae": "ConceptEncoderForTSDAE", "masked_diffusion": "ConceptEncoderForMaskedDiffusion", "prefix_diffusion": "ConceptEncoderForPrefixDiffusion"}),  # noqa: E501
        Architecture("dawn", "DawnConfig", {"AutoModel": "DawnModel", "AutoModelForCausalLM": "DawnForCausalLM", "AutoModelForMaskedLM": "DawnForMaskedLM"}, "neurons as basis-FFN combinations picked per token by a neuron router (DAWN v5.0)"),  # noqa: E501
        Architecture("moh", "MoHConfig", {"AutoModel": "MoHModel", "AutoModelForCausalLM": "MoHForCausalLM"}, "attention heads weighted and skipped per token by a router: standard and fully adaptive Mixture-of-Heads (RustGPT)"),  # noqa: E501
    ]
}


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"unknown architecture {name!r}; choose one of: {', '.join(sorted(ARCHITECTURES))}"
        ) from None


def register_all() -> None:
    """Register every architecture with AutoConfig, AutoModel and its AutoModelFor… classes, and give
    the models the package's remote-code writer (see ``DecollapsePreTrainedModel.save_pretrained``)."""
    from .hub_cards.export import write_remote_code
    from .modeling.common import DecollapsePreTrainedModel

    DecollapsePreTrainedModel._write_remote_code = staticmethod(write_remote_code)
    for arch in ARCHITECTURES.values():
        config_class = arch.config_class
        try:
            AutoConfig.register(config_class.model_type, config_class)
        except ValueError:  # already registered (module re-import); the mapping is the same class
            pass
        for auto_name in arch.models:
            try:
                _AUTO[auto_name].register(config_class, arch.model_class(auto_name))
            except ValueError:
                pass
