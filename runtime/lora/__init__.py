"""Adapters in the runtime: the provider protocol, the tiered cache, loading, and LoRA layers.

Kept free of imports: `runtime.lora.protocol` and `runtime.lora.cache` must load without torch.
"""
