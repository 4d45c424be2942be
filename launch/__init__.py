"""absl entry points: ``python -m launch.train ...`` from the repository root (or
``python launch/train.py ...`` with the package installed). All logic lives in ``feallm_jax``."""
