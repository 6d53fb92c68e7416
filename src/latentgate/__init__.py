"""latentgate: staged latent-prefix LLM experiments, tracked in MLflow, searched with Optuna, gated in the registry.

Flow of the package: data -> model -> train -> eval -> tracking, with phases, registry and analysis on top.
Nothing heavy is imported here, so `latentgate --help` stays fast.
"""

__version__ = "0.1.0"
