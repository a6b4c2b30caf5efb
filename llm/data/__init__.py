"""Text in, token ids out: corpus sources, cleaning, tokenizers, token files, chat data and the chat template."""
