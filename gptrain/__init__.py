"""gptrain: train small GPT language models from YAML configs, and sample from them."""

__version__ = "0.2.0"
