"""Job configs: plain Python files with a get_config() returning a dict (no jax, no torch)."""
