"""A GPT language model written from scratch in PyTorch, with the stages that train and serve it."""

__version__ = "0.1.0"
