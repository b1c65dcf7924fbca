"""MuJoCo tasks with scripted experts, registered with Gymnasium under the ``dp/`` namespace.

Importing this package registers the environments; it imports nothing from the learning code.
A change of a task's dynamics is a new version; the old one stays registered, unchanged, so that
stores and checkpoints made with it keep their meaning.

| id                 | task                                                    | steps |
| ------------------ | ------------------------------------------------------- | ----- |
| ``dp/PushT-v0``    | planar pusher pushes a T-shaped block onto a target T   | 300   |
| ``dp/PushT-v1``    | the same inside walls: the block cannot leave the table | 300   |
| ``dp/Avoid-v0``    | reach a goal around an obstacle, left or right (bimodal) | 100   |
| ``dp/PickPlace-v0``| arm with a gripper picks a cube and places it on a target | 200   |
"""
from gymnasium.envs.registration import register, registry

_ENVS = {
    "dp/PushT-v0": ("envs.pusht:PushTEnv", 300),
    "dp/PushT-v1": ("envs.pusht:PushTWallsEnv", 300),
    "dp/Avoid-v0": ("envs.avoid:AvoidEnv", 100),
    "dp/PickPlace-v0": ("envs.pickplace:PickPlaceEnv", 200),
}

for _id, (_entry, _steps) in _ENVS.items():
    if _id not in registry:
        register(id=_id, entry_point=_entry, max_episode_steps=_steps)
