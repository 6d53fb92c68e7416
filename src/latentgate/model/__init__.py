"""Model: the frozen LM, the latent encoder/adapter, the prefix contract, LoRA."""
