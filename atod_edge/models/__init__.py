"""Models: the preset cache and registry (cache, presets; tiny and smollm2 build the presets, with
the chatml tokens), loading and checks (loading), layer surgery and averaging (surgery), describing
models (describe), and the read-only side of the zoo (zoo)."""
