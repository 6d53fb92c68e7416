"""Training: losses, the stage loop, checkpoints, the base LM."""
