"""atod-edge: distil a large LM agent into a compact edge agent with ATOD (arXiv 2606.27814)."""

__version__ = "0.1.0"
