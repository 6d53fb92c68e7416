"""Tracking: MLflow runs, batched metrics, provenance, secrets masking."""
