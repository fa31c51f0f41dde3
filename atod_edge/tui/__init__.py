"""The atod-edge terminal app (Textual): live runs, the episode inspector, the training dashboard.

Entry point: atod_edge.tui.app.run_tui(path, **opts). Imports only the core (atod_edge.*).
"""
