"""bitvit: Vision Transformers with ternary and binary weights."""

__version__ = "0.1.0"
