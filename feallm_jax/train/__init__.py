"""Training: ``train_and_evaluate(config, workdir)`` plus its parts (optimizer, step, checkpoints)."""

from feallm_jax.train.loop import NonFiniteError, train_and_evaluate

__all__ = ["train_and_evaluate", "NonFiniteError"]
