"""Interop with other ecosystems: Hugging Face Transformers folders in and out (``llm.interop.hf``)."""
