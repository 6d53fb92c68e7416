"""Evaluation: batched KV-cached greedy generation, SQuAD v1.1 scoring, probes, controls."""
