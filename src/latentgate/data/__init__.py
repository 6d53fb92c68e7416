"""Data: the synthetic SQuAD-style generator, readers for SQuAD JSON/JSONL, and record validation."""
