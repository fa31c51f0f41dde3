"""atod-edge: distil a large LM agent into a compact edge agent with ATOD (arXiv 2606.27814).

    from atod_edge import Agent      # an embeddable agent on any backend (atod_edge.rollout.agent)
"""

__version__ = "0.1.0"
__all__ = ["Agent", "__version__"]


def __getattr__(name: str):
    # lazy, so `import atod_edge` (and `atod-edge --help`) does not import torch and the prompts
    if name in ("Agent", "AgentAction"):
        from atod_edge.rollout import agent

        return getattr(agent, name)
    raise AttributeError(f"module 'atod_edge' has no attribute '{name}'")
