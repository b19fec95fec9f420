"""decollapse: Hugging Face-native modular language models whose sub-units collapse, with the tools
to fight that collapse and to prove it."""

from .registry import ARCHITECTURES, get_architecture, register_all

__version__ = "0.1.0"

register_all()

__all__ = ["ARCHITECTURES", "get_architecture", "register_all", "__version__"]
