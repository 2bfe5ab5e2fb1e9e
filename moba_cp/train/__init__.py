"""Training on Megatron-Core: ``moba-cp train`` / ``python -m moba_cp.train``."""
