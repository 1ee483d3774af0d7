"""Cross-framework throughput: jaxface against the PyTorch reference (`python -m compare`)."""
