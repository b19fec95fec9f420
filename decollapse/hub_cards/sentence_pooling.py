"""The sentence-transformers pooling module of an exported concept encoder.

A concept model's base output holds C concept vectors, not one state per token, so its sentence
embedding is their plain mean, ``e = (1/C) Σ_c z_c``, the parameter-free pooling of ``decollapse
eval``. sentence-transformers' stock ``Pooling`` would apply the token attention mask whenever the
padded length happens to equal C, silently dropping concepts; this module never does.

It imports only torch and the standard library because ``decollapse export`` copies it into the
Hub folder, where ``SentenceTransformer(folder, trust_remote_code=True)`` loads it by the name in
``modules.json`` without decollapse installed. It is a module in the classic sentence-transformers
form: ``forward(features)``, ``save(path)`` and a one-argument ``load(path)``.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

CONFIG_NAME = "config.json"


class ConceptMeanPooling(nn.Module):
    def __init__(self, embedding_dimension: int):
        super().__init__()
        self.embedding_dimension = embedding_dimension

    def forward(self, features: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
        concepts = features["token_embeddings"]  # (B, C, H)
        features["sentence_embedding"] = concepts.mean(dim=1)
        return features

    def get_embedding_dimension(self) -> int:
        return self.embedding_dimension

    # sentence-transformers < 5 asks for the dimension under this name.
    get_sentence_embedding_dimension = get_embedding_dimension

    def save(self, output_path: str, *args, **kwargs) -> None:
        os.makedirs(output_path, exist_ok=True)
        with open(os.path.join(output_path, CONFIG_NAME), "w") as fh:
            json.dump({"embedding_dimension": self.embedding_dimension}, fh, indent=2)

    @staticmethod
    def load(input_path: str) -> "ConceptMeanPooling":
        with open(os.path.join(input_path, CONFIG_NAME)) as fh:
            return ConceptMeanPooling(**json.load(fh))
