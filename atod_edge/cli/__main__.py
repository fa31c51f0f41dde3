"""`python -m atod_edge.cli`: the same as the `atod-edge` command."""

from atod_edge.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
