"""LoRA adapters: registry, sources, conversion from PEFT to GGUF, loading."""
