"""The GPT itself (``gpt.py``, one readable file) and its checkpoint folders."""
