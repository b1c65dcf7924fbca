"""Scripted experts, by name.

An expert is driven as ``expert.reset(env, rng)`` right after ``env.reset(seed=...)``, then
``action = expert.act(env)`` every step; it may read the simulator through ``env.unwrapped``. All of
its randomness comes from ``rng`` (a ``np.random.Generator``), so an episode is a function of the
env seed and the expert's generator.

``make_expert(name)`` also accepts ``"module:callable"``, a function ``obs -> action`` of any
importable module (external suites, see ``envs/external.py``).
"""
from __future__ import annotations

from envs.experts.avoid import AvoidExpert
from envs.experts.pickplace import PickPlaceExpert
from envs.experts.pusht import PushTExpert

EXPERTS: dict[str, type] = {
    "avoid": AvoidExpert,
    "pickplace": PickPlaceExpert,
    "pusht": PushTExpert,
}


def make_expert(name: str):
    """The expert registered as ``name``, or a ``"module:callable"`` policy wrapped as an expert."""
    if ":" in name:
        from envs.external import CallableExpert

        return CallableExpert.from_path(name)
    if name not in EXPERTS:
        raise KeyError(f"unknown expert {name!r}; registered: {sorted(EXPERTS)} (or 'module:callable')")
    return EXPERTS[name]()
