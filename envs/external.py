"""Environments of other Gymnasium suites (MetaWorld, gymnasium-robotics, your own) as tasks here.

Every task of this package speaks one dialect (DESIGN.md): a ``Dict`` observation of flat float32
and uint8-image keys (the keys of the Zarr store), a float32 ``Box`` action, ``info["success"]`` on
every step and ``terminated`` on success. :class:`ExternalEnv` translates any Gymnasium env with a
``Box`` or ``Dict`` observation and a success signal in ``info`` into that dialect, so collection,
training and evaluation need only a task config:

    # configs/task/fetch_reach.yaml (gymnasium-robotics; goal-conditioned Dict observation)
    defaults: [task_schema, _self_]
    name: fetch_reach
    env_id: envs.external:dp/External-v0      # "module:id" makes gymnasium import this module
    env_kwargs: {env_id: FetchReach-v4, obs_mode: state}
    obs_keys: [observation, desired_goal]      # the flattened keys of the Dict observation
    expert: "my_package.experts:fetch_reach"   # a callable obs -> action (see CallableExpert)

MetaWorld (``dp/MetaWorld-v0``) adds seeded initial states and its scripted policies; see
:func:`make_metaworld`.

Observation translation: a ``Box`` becomes ``{"state": ...}``; a ``Dict`` (nested or not) becomes
one key per leaf, the path joined by ``_`` (``{"robot": {"pos": ...}}`` -> ``robot_pos``); every
low-dimensional leaf is float32. ``obs_slices`` adds named slices of ``state``
(``{agent_pos: [0, 4]}``), and ``obs_mode="image"`` adds ``image``, the env's ``render()``.
"""
from __future__ import annotations

import importlib
import inspect

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.envs.registration import register, registry

SUCCESS_KEYS = ("success", "is_success")  # MetaWorld / gymnasium-robotics


def _flatten_space(space: spaces.Space, prefix: str = "") -> dict[str, spaces.Box]:
    if isinstance(space, spaces.Box):
        return {prefix or "state": space}
    if isinstance(space, spaces.Dict):
        out = {}
        for key, sub in space.spaces.items():
            for name, leaf in _flatten_space(sub, f"{prefix}_{key}" if prefix else key).items():
                if name in out:
                    raise ValueError(f"ExternalEnv: flattened observation key {name!r} occurs twice")
                out[name] = leaf
        return out
    raise TypeError(
        f"ExternalEnv: observation space {prefix or '(root)'} is {type(space).__name__}; "
        f"expected Box or Dict of Box"
    )


def _flatten_obs(obs, prefix: str = "") -> dict[str, np.ndarray]:
    if isinstance(obs, dict):
        out = {}
        for key, sub in obs.items():
            out.update(_flatten_obs(sub, f"{prefix}_{key}" if prefix else key))
        return out
    return {prefix or "state": np.asarray(obs)}


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[:2] == (size, size):
        return image
    from PIL import Image  # a dependency of imageio

    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


class ExternalEnv(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Translate a Gymnasium env into this package's dialect (module docstring).

    Args:
        env: the env to wrap; for ``obs_mode="image"`` made with ``render_mode="rgb_array"``.
        obs_mode: ``state`` (low-dimensional keys only) or ``image`` (plus ``image``).
        image_size: side of the square ``image`` (rendered frames are resized to it).
        obs_slices: extra keys cut out of the flat ``state`` key, ``{name: [start, stop]}``.
        terminate_on_success: end the episode at the first success (the dialect's rule).
        reward: ``success`` (1.0 on success, else 0.0: in [0, 1] like the tasks here) or ``env``
            (the env's own reward). The env's reward is always in ``info["env_reward"]``.
        flip_vertical: turn rendered frames upside down (for suites whose cameras render them so).
        bounded: keep the declared bounds of low-dimensional observations (as float32); False
            declares them unbounded, for suites whose observations leave their own bounds
            (MetaWorld's do, and an observation outside its space fails Gymnasium's checker).
    """

    def __init__(
        self,
        env: gym.Env,
        obs_mode: str = "state",
        image_size: int = 96,
        obs_slices: dict | None = None,
        terminate_on_success: bool = True,
        reward: str = "success",
        flip_vertical: bool = False,
        bounded: bool = True,
    ):
        gym.utils.RecordConstructorArgs.__init__(
            self, obs_mode=obs_mode, image_size=image_size, obs_slices=obs_slices,
            terminate_on_success=terminate_on_success, reward=reward, flip_vertical=flip_vertical,
            bounded=bounded)
        super().__init__(env)
        if obs_mode not in ("state", "image"):
            raise ValueError(f"ExternalEnv: obs_mode must be 'state' or 'image', got {obs_mode!r}")
        if reward not in ("success", "env"):
            raise ValueError(f"ExternalEnv: reward must be 'success' or 'env', got {reward!r}")
        if obs_mode == "image" and env.render_mode != "rgb_array":
            raise ValueError(
                f"ExternalEnv: obs_mode='image' renders the env, so it must be made with "
                f"render_mode='rgb_array' (got {env.render_mode!r})"
            )
        self.obs_mode, self.image_size, self.terminate_on_success = obs_mode, image_size, terminate_on_success
        self.reward_mode, self.flip_vertical = reward, flip_vertical
        self.obs_slices = {k: tuple(v) for k, v in (obs_slices or {}).items()}
        leaves = _flatten_space(env.observation_space)

        def box(b: spaces.Box, sl=slice(None)) -> spaces.Box:
            if b.dtype == np.uint8 and len(b.shape) == 3:  # an image leaf stays uint8 (H, W, C)
                return b
            if not bounded:
                return spaces.Box(-np.inf, np.inf, shape=b.low[sl].shape, dtype=np.float32)
            return spaces.Box(b.low[sl].astype(np.float32), b.high[sl].astype(np.float32), dtype=np.float32)

        obs_space = {k: box(b) for k, b in leaves.items()}
        for name, (start, stop) in self.obs_slices.items():
            if "state" not in leaves or len(leaves["state"].shape) != 1:
                raise ValueError(f"ExternalEnv: obs_slices need a flat Box observation ('state'), "
                                 f"got keys {list(leaves)}")
            if name in obs_space or not 0 <= start < stop <= leaves["state"].shape[0]:
                raise ValueError(f"ExternalEnv: obs_slices[{name!r}] = [{start}, {stop}] is not a new key "
                                 f"and a slice of state (dim {leaves['state'].shape[0]})")
            obs_space[name] = box(leaves["state"], slice(start, stop))
        if obs_mode == "image":
            if "image" in obs_space:
                raise ValueError("ExternalEnv: the env already has an observation key 'image'")
            obs_space["image"] = spaces.Box(0, 255, shape=(image_size, image_size, 3), dtype=np.uint8)
        self.observation_space = spaces.Dict(obs_space)
        a = env.action_space
        if not isinstance(a, spaces.Box):
            raise TypeError(f"ExternalEnv: action space is {type(a).__name__}; expected Box")
        self.action_space = spaces.Box(a.low.astype(np.float32), a.high.astype(np.float32), dtype=np.float32)
        self._success_key = None
        self.last_raw_obs = None
        """The wrapped env's latest observation, untranslated (what a suite's own expert reads)."""

    def _translate(self, raw) -> dict:
        self.last_raw_obs = raw
        obs = {k: v if v.dtype == np.uint8 and v.ndim == 3 else v.astype(np.float32)  # images stay uint8
               for k, v in ((k, np.asarray(v)) for k, v in _flatten_obs(raw).items())}
        for name, (start, stop) in self.obs_slices.items():
            obs[name] = obs["state"][start:stop].copy()
        if self.obs_mode == "image":
            obs["image"] = _resize(self.render(), self.image_size)
        return obs

    def render(self):
        frame = self.env.render()
        if frame is None or not self.flip_vertical:
            return frame
        return np.ascontiguousarray(frame[::-1])

    def _success(self, info: dict) -> bool:
        if self._success_key is None:
            found = [k for k in SUCCESS_KEYS if k in info]
            if not found:
                raise KeyError(f"ExternalEnv: info has none of {SUCCESS_KEYS} (keys: {sorted(info)}); "
                               f"expected a success signal")
            self._success_key = found[0]
        return bool(info[self._success_key])

    def reset(self, *, seed=None, options=None):
        raw, info = self.env.reset(seed=seed, options=options)
        return self._translate(raw), {**info, "success": False}

    def step(self, action):
        raw, reward, terminated, truncated, info = self.env.step(np.asarray(action, dtype=self.env.action_space.dtype))
        success = self._success(info)
        info = {**info, "success": success, "env_reward": float(reward)}
        if self.reward_mode == "success":
            reward = float(success)
        terminated = bool(terminated or (success and self.terminate_on_success))
        return self._translate(raw), float(reward), terminated, bool(truncated), info


def make_external(env_id: str, env_kwargs: dict | None = None, obs_mode: str = "state",
                  render_mode: str | None = None, **wrapper_kwargs) -> ExternalEnv:
    """``gymnasium.make(env_id, **env_kwargs)`` wrapped in :class:`ExternalEnv` (``dp/External-v0``)."""
    env_kwargs = dict(env_kwargs or {})
    if obs_mode == "image" or render_mode is not None:
        env_kwargs["render_mode"] = "rgb_array"
    return ExternalEnv(gym.make(env_id, **env_kwargs), obs_mode=obs_mode, **wrapper_kwargs)


# ------------------------------------------------------------------------------------ MetaWorld
class MetaWorldSeeding(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Make a MetaWorld MT1 env's initial state a function of ``reset(seed=...)``.

    MetaWorld 3 ignores the seed of ``reset``: its MT1 env draws one of 50 fixed task variations
    (object and goal positions) from a generator seeded at construction. Here every seed gives its
    own variation, drawn by MetaWorld's own code (``_get_state_rand_vec``, uniform over the task's
    ``_random_reset_space`` with its rejection of invalid layouts) from a generator seeded with it.
    """

    def __init__(self, env: gym.Env):
        gym.utils.RecordConstructorArgs.__init__(self)
        super().__init__(env)
        self._configured = False
        self._rng = np.random.default_rng()

    def reset(self, *, seed=None, options=None):
        u = self.env.unwrapped
        if not self._configured:
            self.env.reset()  # applies MT1's task settings (goal observable) once
            w = self.env
            while not hasattr(w, "toggle_sample_tasks_on_reset"):
                w = w.env
            w.toggle_sample_tasks_on_reset(False)
            self._configured = True
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        u._freeze_rand_vec, u.seeded_rand_vec = False, True
        u.np_random = self._rng  # the env draws its layout from this generator
        return self.env.reset()


def make_metaworld(task: str, obs_mode: str = "state", image_size: int = 96, render_size: int = 256,
                   camera: str = "corner2", render_mode: str | None = None, **wrapper_kwargs) -> ExternalEnv:
    """A MetaWorld v3 task by name (``push-v3``) as ``dp/MetaWorld-v0``.

    Observation ``state``: MetaWorld's 39 numbers (hand xyz, gripper opening, two objects' poses,
    the same 18 numbers one step earlier, goal xyz); ``agent_pos`` = its first 4 (hand, gripper);
    ``image`` (``obs_mode="image"``) from camera ``camera``. Action: MetaWorld's 4-D Box (hand
    displacement, gripper). Success: MetaWorld's ``info["success"]``.
    Expert: ``metaworld.policies:Sawyer<Task>V3Policy`` (its scripted policies).
    """
    try:
        import metaworld  # noqa: F401  (registers Meta-World/*)
    except ImportError as e:
        raise ImportError(
            "dp/MetaWorld-v0 needs MetaWorld: pip install --no-deps metaworld==3.1.1 "
            "(it asks for mujoco==3.3.0 but runs on the mujoco installed here)"
        ) from e
    size = image_size if obs_mode == "image" else render_size
    rendering = obs_mode == "image" or render_mode is not None
    env = gym.make(
        "Meta-World/MT1", env_name=task, seed=0, disable_env_checker=True,
        **({"render_mode": "rgb_array", "camera_name": camera, "width": size, "height": size} if rendering else {}),
    )
    # Software GL (EGL on CPUs) spends most of a frame on shadows and multisampling: drop both.
    env.unwrapped.model.vis.quality.shadowsize = 0
    env.unwrapped.model.vis.quality.offsamples = 0
    wrapper_kwargs.setdefault("obs_slices", {"agent_pos": [0, 4]})
    wrapper_kwargs.setdefault("flip_vertical", True)  # MetaWorld's cameras render upside down
    wrapper_kwargs.setdefault("bounded", False)  # its observations leave its declared bounds
    return ExternalEnv(MetaWorldSeeding(env), obs_mode=obs_mode, image_size=image_size, **wrapper_kwargs)


for _id, _entry in {"dp/External-v0": make_external, "dp/MetaWorld-v0": make_metaworld}.items():
    if _id not in registry:
        register(id=_id, entry_point=_entry)


# -------------------------------------------------------------------------------------- experts
class CallableExpert:
    """An expert from a policy ``obs -> action`` of another suite, named ``"module:attr"``.

    ``attr`` may be a function ``obs -> action``, or a class (instantiated with no arguments) whose
    instances have ``get_action(obs)`` (MetaWorld's scripted policies) or are callable. It receives
    the wrapped env's own observation (``ExternalEnv.last_raw_obs``), not the translated dict.
    """

    def __init__(self, fn, name: str = ""):
        self.fn, self.name = fn, name

    @classmethod
    def from_path(cls, path: str) -> "CallableExpert":
        module_name, _, attr = path.partition(":")
        if not module_name or not attr:
            raise ValueError(f"expert {path!r}: expected 'module:callable'")
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        if inspect.isclass(obj):
            obj = obj()
        fn = getattr(obj, "get_action", obj)
        if not callable(fn):
            raise TypeError(f"expert {path!r} is a {type(obj).__name__}; expected a callable obs -> action")
        return cls(fn, path)

    def reset(self, env, rng: np.random.Generator) -> None:
        pass

    def act(self, env) -> np.ndarray:
        raw = env.get_wrapper_attr("last_raw_obs")
        if raw is None:
            raise RuntimeError(f"expert {self.name!r}: no observation yet; reset the env first")
        return np.asarray(self.fn(raw), dtype=np.float32)
