"""Models: loading (HF folder, hub id, GGUF file), LoRA / DoRA insertion, the adapter-off
reference mode, chat templates, and sequence log-probabilities."""
