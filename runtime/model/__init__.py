"""The base model on its device: checkpoint, forward, paged KV cache, sampling, tokenizer."""
