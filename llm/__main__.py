"""``python -m llm`` runs the same command as ``llm``."""

from llm.cli import run

run()
