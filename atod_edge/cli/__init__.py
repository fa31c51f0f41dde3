"""The `atod-edge` command line."""
