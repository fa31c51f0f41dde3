"""A built-in ALFWorld-style household environment, pure Python and procedurally generated.

Registered as `household` (atod_edge/envs/__init__.py: "atod_edge.envs.household.env:HouseholdEnv").
Each task is a small room built from `random.Random(task.seed)` with one goal from the six
ALFWorld task families. The modules follow the data flow:

    catalog.py   the vocabulary: receptacle and object kinds, task families, object pools per split
    world.py     Room: one room and goal drawn from the seed, and the state the episode changes
    env.py       HouseholdEnv (a Room): reset, admissible actions, step semantics and feedback
    experts.py   the visible expert (acts on the prompt's view, imitable) and the oracle

Import what you need from the module that declares it; this package file holds no names.
"""
