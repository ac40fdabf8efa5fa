"""tomelab: a data-centric fine-tuning lab for small instruction-tuned LLMs."""

__version__ = "0.1.0"
