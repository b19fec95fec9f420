"""The architecture registry.

Each architecture declares its facts once, in ``decollapse/architectures/<name>.py``, with one
:func:`register_architecture` call, the way PEFT registers a tuning method
(``register_peft_method(name=..., config_cls=..., model_cls=...)``). This module discovers those files;
the Auto-class registration, the CLI, ``decollapse list``, the model card, the tests' tiny models and
the parametrized contract tests (causality, padding invariance, save/load, generation, export) all read
the resulting table. Adding an architecture therefore means:

- ``configuration/<name>.py`` (its ``PretrainedConfig``) and ``modeling/<name>.py`` (its models, which
  may import a sibling architecture's modeling file to reuse a block);
- ``architectures/<name>.py``: one ``register_architecture(...)`` call;
- ``tests/test_<name>.py``, a ``docs/<NAME>.md`` page and a README row.

Facts that belong to a model class (``lora_target_modules``, ``sentence_pooling``,
``collapse_headline``) stay class attributes of the architecture's ``PreTrainedModel`` and are read
through the properties below, so they too are written once.

Imports point down only: this module imports transformers, the architectures' own files (lazily) and
``remote_code``; never the Hub layer, the runner or the CLI.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any

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


class RegistrationError(ValueError):
    """An architecture's registration is incomplete or inconsistent; raised when it registers."""


@dataclass(frozen=True)
class Architecture:
    """Everything decollapse needs to know about one architecture besides its code.

    Attributes:
        name: the CLI and registry name; also the module name under ``configuration/`` and ``modeling/``.
        config: the configuration class name in ``configuration/<name>.py``.
        models: Auto class name -> model class name in ``modeling/<name>.py``; ``"AutoModel"`` is required.
        summary: one line for ``decollapse list`` and the model card.
        citations: the public work the architecture implements (papers, repositories with a commit),
            one Markdown line each; printed in the model card.
        limitations: what the project's own measurements found the architecture does not do, in one
            or two honest sentences; printed in the model card.
        extra_heads: pre-training objectives with no transformers Auto class (TSDAE, diffusion):
            objective -> model class name.
        tiny: config overrides that make a model of a few thousand parameters for unit tests, on top
            of the shared tiny shape (hidden 32, 2 layers, 32 positions, 61 tokens).
        variants: named overrides on top of ``tiny`` for settings that change what attends to what (a
            contextual state, a token graph, …). The contract tests of causality and padding
            invariance run on each variant as well as on ``tiny``, so a setting cannot leak unnoticed.
        probe_size: validation rows the collapse report of ``decollapse train`` reads by default (more
            for measurements that need many occurrences, such as homonym baselines).
        ddp_find_unused_parameters: whether a training step can leave a trainable parameter without a
            gradient (e.g. a router that skips units). DDP must then look for unused parameters; a
            contract test checks the declared value against a real step.
        package: the package whose ``configuration/`` and ``modeling/`` folders hold the files.
    """

    name: str
    config: str
    models: dict[str, str]
    summary: str
    citations: tuple[str, ...]
    limitations: str
    extra_heads: dict[str, str] = field(default_factory=dict)
    tiny: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    probe_size: int = 16
    ddp_find_unused_parameters: bool = False
    package: str = "decollapse"

    # -- classes ---------------------------------------------------------------------------------
    @property
    def config_class(self):
        return getattr(importlib.import_module(f"{self.package}.configuration.{self.name}"), self.config)

    def model_class(self, auto_name: str):
        return self._class(self.models[auto_name])

    def _class(self, class_name: str):
        return getattr(importlib.import_module(f"{self.package}.modeling.{self.name}"), class_name)

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

    # -- facts declared on the model classes ------------------------------------------------------
    @property
    def sentence_pooling(self) -> str | None:
        return self.model_class("AutoModel").sentence_pooling

    @property
    def lora_target_modules(self) -> list[str] | None:
        return self.model_class("AutoModel").lora_target_modules

    @property
    def collapse_headline(self) -> dict[str, tuple[str, str]]:
        return self.model_class("AutoModel").collapse_headline


ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(
    *,
    name: str,
    config: str,
    models: dict[str, str],
    summary: str,
    citations: tuple[str, ...] | list[str],
    limitations: str,
    extra_heads: dict[str, str] | None = None,
    tiny: dict[str, Any] | None = None,
    variants: dict[str, dict[str, Any]] | None = None,
    probe_size: int = 16,
    ddp_find_unused_parameters: bool = False,
    package: str = "decollapse",
) -> Architecture:
    """Adds an architecture to :data:`ARCHITECTURES` and returns it.

    Every fact a model card or a test needs is required here, so a forgotten citation or limitation
    fails at import rather than printing a blank in a published card. The classes themselves are
    imported lazily (``decollapse list`` stays fast); :func:`register_all` resolves them.
    """
    where = f"register_architecture(name={name!r})"
    if not name or not name.isidentifier():
        raise RegistrationError(f"{where}: the name must be a Python identifier (it names the module files)")
    if name in ARCHITECTURES:
        raise RegistrationError(f"{where}: an architecture of that name is already registered")
    if "AutoModel" not in models:
        raise RegistrationError(f"{where}: models must map 'AutoModel' to the base model class")
    unknown = sorted(set(models) - set(_AUTO))
    if unknown:
        raise RegistrationError(f"{where}: unknown Auto class(es) {unknown}; known: {', '.join(_AUTO)}")
    if not summary or not summary.strip():
        raise RegistrationError(f"{where}: a one-line summary is required")
    citations = tuple(citations)
    if not citations or not all(isinstance(c, str) and c.strip() for c in citations):
        raise RegistrationError(f"{where}: at least one citation (a paper or public repository) is required")
    if not isinstance(limitations, str) or not limitations.strip():
        raise RegistrationError(f"{where}: a limitations statement is required (what the architecture does not do)")
    arch = Architecture(
        name=name,
        config=config,
        models=dict(models),
        summary=summary,
        citations=citations,
        limitations=limitations,
        extra_heads=dict(extra_heads or {}),
        tiny=dict(tiny or {}),
        variants={label: dict(overrides) for label, overrides in (variants or {}).items()},
        probe_size=probe_size,
        ddp_find_unused_parameters=ddp_find_unused_parameters,
        package=package,
    )
    ARCHITECTURES[name] = arch
    return arch


def unregister_architecture(name: str) -> None:
    """Removes an architecture from the table (for tests that register a throw-away one)."""
    ARCHITECTURES.pop(name, None)


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"unknown architecture {name!r}; choose one of: {', '.join(sorted(ARCHITECTURES))}"
        ) from None


def architecture_of(config) -> Architecture | None:
    """The registered architecture whose configuration class ``config`` is an instance of."""
    return next((a for a in ARCHITECTURES.values() if isinstance(config, a.config_class)), None)


def _discover() -> None:
    """Imports every module of ``decollapse.architectures``; each registers itself."""
    from . import architectures

    for module in sorted(pkgutil.iter_modules(architectures.__path__), key=lambda m: m.name):
        if not module.name.startswith("_"):
            importlib.import_module(f"{architectures.__name__}.{module.name}")


def register_all() -> None:
    """Register every architecture with AutoConfig, AutoModel and its AutoModelFor… classes, and give
    the models the package's remote-code writer (see ``DecollapsePreTrainedModel.save_pretrained``)."""
    from .modeling.common import DecollapsePreTrainedModel
    from .remote_code import write_remote_code

    def write_for_registered(model, folder) -> None:
        arch = architecture_of(model.config)
        if arch is None:
            raise RegistrationError(f"{type(model).__name__}: its config is not a registered decollapse configuration")
        write_remote_code(arch, folder)

    DecollapsePreTrainedModel._write_remote_code = staticmethod(write_for_registered)
    for arch in ARCHITECTURES.values():
        register_with_auto_classes(arch)


def register_with_auto_classes(arch: Architecture) -> None:
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


_discover()
