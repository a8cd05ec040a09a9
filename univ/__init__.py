"""univ: mechanistic similarity across language model architectures."""

__version__ = "0.1.0"
