"""Tools that make smaller or faster models from a base one: quantized checkpoints (more to come:
pruning, distillation, LoRA merge). They run the engine (`LLM`), so they sit above it."""
