"""Receding-horizon control around a stateless policy.

Every control step the caller hands in the newest observation of each environment and gets one
action per environment back. The controller keeps what the policy must not (DESIGN.md: the policy
is stateless): the last ``To`` observations of each environment and the chunks still being
executed. Timeline of one chunk predicted at step ``t`` (Chi et al. 2023, Fig. 3)::

    chunk index  0 ... To-2 | To-1   To ... To-2+Ta | ... H-1
    time step    t-To+1 ... | t      t+1 ... t+Ta-1 | ...
                 (past obs)   first executed action   replan at t+Ta

so the first executed action is chunk index ``To-1`` (the action for the current observation),
``Ta`` actions are executed, then the policy is asked again. At episode start the first
observation is repeated ``To`` times, like the window padding used in training.

Smoothing across chunks (``smoothing``):
- ``none``: execute the newest chunk as predicted.
- ``ensemble``: temporal ensembling as in ACT (Zhao et al. 2023, Sec. 3.3): the action for step
  ``t`` is the weighted mean of every stored chunk's prediction for ``t``, with weights
  ``exp(-k * i)`` where ``i = 0`` is the oldest prediction. With ``Ta = 1`` this is ACT exactly.
- ``blend``: when a new chunk arrives, the part of the previous chunk that overlaps it in time
  (its ``H - To + 1 - Ta`` unexecuted predictions) is blended in with a linear ramp, so the plan
  moves from the old chunk to the new one instead of jumping (cf. the 0.3/0.7 blend of LeRobot's
  asynchronous inference, here as a ramp).

The controller knows nothing of Gymnasium: it consumes ``{key: array (n_envs, ...)}`` dicts and
returns ``(n_envs, Da)`` numpy arrays, so the evaluation job and the deploy loop share it.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

SMOOTHING = ("none", "ensemble", "blend")


def ensemble_weights(n: int, k: float) -> np.ndarray:
    """Normalized ACT temporal-ensembling weights for ``n`` predictions of one step.

    Index 0 is the oldest prediction: ``w_i = exp(-k i) / sum_j exp(-k j)``. ``k > 0`` trusts
    older chunks more (ACT's choice, smoother); ``k < 0`` trusts newer ones; ``k = 0`` averages.
    """
    w = np.exp(-k * np.arange(n, dtype=np.float64))
    return w / w.sum()


def blend_chunks(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Blend the overlap of the previous plan into the new one with a linear ramp.

    ``old`` (L, Da): the previous plan's predictions for the first ``L`` steps of ``new`` (M, Da),
    ``L <= M``. Step ``j < L`` gets weight ``(j + 1) / (L + 1)`` on the new chunk, the rest of
    ``new`` is kept as is. Returns a new array (M, Da).
    """
    n_overlap = len(old)
    if n_overlap > len(new):
        raise ValueError(f"blend_chunks: overlap of {n_overlap} steps is longer than the new "
                         f"chunk ({len(new)} steps)")
    out = np.array(new, dtype=np.float64, copy=True)
    if n_overlap:
        alpha = (np.arange(n_overlap) + 1.0) / (n_overlap + 1.0)  # weight of the new chunk
        out[:n_overlap] = (1.0 - alpha[:, None]) * old + alpha[:, None] * new[:n_overlap]
    return out


@dataclass
class _EnvState:
    """What the controller remembers about one environment's current episode."""

    history: deque  # last To observations, each {key: array}
    step: int = 0  # steps taken in this episode (the step whose action is asked next)
    # chunks still covering future steps: (first step they act at, actions (H-To+1, Da))
    chunks: list = field(default_factory=list)
    generator: torch.Generator | None = None


class RecedingHorizonController:
    """Observe ``To`` steps, predict an ``H``-step chunk, execute ``Ta`` actions, replan.

    Args:
        policy: any object with ``predict(obs: {key: Tensor (B, To, ...)}, num_steps=None,
            generator=None) -> (B, H, Da)`` and attributes ``horizon``, ``n_obs_steps``,
            ``n_action_steps``, ``obs_keys``. It is called with raw observations (images uint8).
        n_envs: environments served; every array passed to :meth:`act` has this leading size.
        smoothing: ``none``, ``ensemble`` or ``blend`` (module docstring).
        ensemble_k: the ``k`` of the ensembling weights.
        n_action_steps: override the policy's ``Ta`` (e.g. 1 for ACT-style ensembling).
        num_inference_steps: passed to ``predict`` as ``num_steps`` (None = the policy's default).
        generator: shared sampler generator for environments without their own (see
            :meth:`reset`).
        device: where observations go before ``predict`` (default: the policy's parameters' device).
    """

    def __init__(self, policy, n_envs: int = 1, smoothing: str = "none", ensemble_k: float = 0.01,
                 n_action_steps: int | None = None, num_inference_steps: int | None = None,
                 generator: torch.Generator | None = None, device: str | torch.device | None = None):
        if smoothing not in SMOOTHING:
            raise ValueError(f"smoothing={smoothing!r}: expected one of {SMOOTHING}")
        if n_envs < 1:
            raise ValueError(f"n_envs must be >= 1, got {n_envs}")
        self.policy = policy
        self.n_envs = n_envs
        self.smoothing = smoothing
        self.ensemble_k = float(ensemble_k)
        self.horizon = int(policy.horizon)
        self.n_obs_steps = int(policy.n_obs_steps)
        self.n_action_steps = int(n_action_steps or policy.n_action_steps)
        n_exec = self.horizon - self.n_obs_steps + 1  # usable actions per chunk
        if not 1 <= self.n_action_steps <= n_exec:
            raise ValueError(f"n_action_steps (Ta={self.n_action_steps}) must be in [1, H - To + 1 = "
                             f"{n_exec}] (H={self.horizon}, To={self.n_obs_steps})")
        self.obs_keys = list(policy.obs_keys)
        self.num_inference_steps = num_inference_steps
        self.generator = generator
        self.device = torch.device(device) if device is not None else _policy_device(policy)
        self.latencies_ms: list[float] = []  # wall time of every predict call
        self.batch_sizes: list[int] = []  # rows of every predict call
        self._generator_lists: bool | None = None  # does predict take a list of generators?
        self._envs = [self._fresh() for _ in range(n_envs)]

    # ------------------------------------------------------------------------------ episodes
    def _fresh(self, generator: torch.Generator | None = None) -> _EnvState:
        return _EnvState(history=deque(maxlen=self.n_obs_steps), generator=generator)

    def reset(self, env_ids=None, generator: torch.Generator | None = None) -> None:
        """Forget the episode of the given environments (all by default) before their next one.

        ``generator``: a sampler generator for these environments' next episode. Environments with
        their own generator are predicted one row at a time, so what they sample does not depend
        on which other environments happen to replan at the same step.
        """
        ids = range(self.n_envs) if env_ids is None else np.atleast_1d(env_ids).tolist()
        for i in ids:
            self._envs[int(i)] = self._fresh(generator)

    # ------------------------------------------------------------------------------ acting
    def act(self, obs: dict, active=None) -> np.ndarray:
        """One control step. ``obs``: ``{key: array (n_envs, ...)}`` newest observations.

        ``active``: optional bool mask (n_envs,); inactive environments are neither observed nor
        planned for, and their rows of the result are NaN. Returns actions ``(n_envs, Da)``.
        """
        active = np.ones(self.n_envs, bool) if active is None else np.asarray(active, bool)
        missing = [k for k in self.obs_keys if k not in obs]
        if missing:
            raise KeyError(f"observation lacks keys {missing} the policy conditions on "
                           f"(got {sorted(obs)})")
        ids = np.flatnonzero(active)
        for i in ids:
            # copied: a caller that reuses its observation buffer must not rewrite the history
            self.observe(i, {k: obs[k][i] for k in self.obs_keys})
        replan = [i for i in ids if self._needs_plan(self._envs[i])]
        if replan:
            self._plan(replan)
        actions = None
        for i in ids:
            st = self._envs[i]
            self.prune(i, st.step)
            a = self.action_at(i, st.step)
            if actions is None:
                actions = np.full((self.n_envs, a.shape[-1]), np.nan, dtype=np.float32)
            actions[i] = a
            st.step += 1
        if actions is None:
            raise ValueError("act: no active environment")
        return actions

    # ------------------------------------------------------------------------------ pieces
    # The synchronous act() above and the asynchronous deploy loop (control/realtime.py) are both
    # built from these: a history per environment, chunks stored with the step they start at, and
    # the action the stored chunks give for a step. In the deploy loop a "step" is a tick of the
    # control-rate grid (time t0 + step * dt) and a chunk starts at the step of its observation.
    def observe(self, i: int, frame: dict) -> None:
        """Append one observation ``{key: array}`` (copied) to environment ``i``'s history; the
        first of an episode is repeated ``To`` times, like the window padding of training."""
        st = self._envs[int(i)]
        frame = {k: np.array(frame[k], copy=True) for k in self.obs_keys}
        if not st.history:
            st.history.extend([frame] * self.n_obs_steps)
        else:
            st.history.append(frame)

    def history_batch(self, ids) -> dict:
        """The ``To``-step windows of environments ``ids`` as ``{key: array (B, To, ...)}``, raw
        units, copies (safe to hand to another thread while the history moves on)."""
        return {k: np.stack([np.stack([f[k] for f in self._envs[int(i)].history]) for i in ids])
                for k in self.obs_keys}

    def add_chunk(self, i: int, chunk: np.ndarray, start: int) -> None:
        """Store a predicted chunk ``(H, Da)`` of environment ``i`` whose index ``To-1`` acts at
        step ``start`` (the step of the observation it was predicted from)."""
        chunk = np.asarray(chunk)
        if chunk.ndim != 2 or chunk.shape[0] != self.horizon:
            raise ValueError(f"add_chunk: chunk has shape {chunk.shape}, expected (H={self.horizon}, Da)")
        self._add_chunk(self._envs[int(i)], chunk[self.n_obs_steps - 1:], int(start))

    def prune(self, i: int, step: int) -> None:
        """Forget chunks of environment ``i`` that no longer reach ``step`` (ensembling keeps
        every chunk that still covers a future step)."""
        st = self._envs[int(i)]
        if self.smoothing == "ensemble":
            st.chunks[:] = [(s, c) for s, c in st.chunks if step - s < len(c)]

    def action_at(self, i: int, step: int) -> np.ndarray:
        """The action ``(Da,)`` the stored chunks of environment ``i`` give for ``step``: the newest
        chunk's, or with ``ensemble`` the weighted mean of every chunk covering it (oldest first).
        Raises IndexError when no stored chunk covers ``step``."""
        st = self._envs[int(i)]
        if self.smoothing == "ensemble":
            preds = [c[step - s] for s, c in st.chunks if 0 <= step - s < len(c)]
            if not preds:
                raise IndexError(f"action_at: no stored chunk covers step {step}")
            w = ensemble_weights(len(preds), self.ensemble_k)
            return (w[:, None] * np.stack(preds)).sum(0).astype(np.float32)
        if not st.chunks or not 0 <= step - st.chunks[-1][0] < len(st.chunks[-1][1]):
            raise IndexError(f"action_at: no stored chunk covers step {step}")
        start, chunk = st.chunks[-1]
        return chunk[step - start].astype(np.float32)

    def plan_span(self, i: int) -> tuple[int, int] | None:
        """``(first, last)`` step covered by the newest chunk of environment ``i`` (None if none)."""
        st = self._envs[int(i)]
        if not st.chunks:
            return None
        start, chunk = st.chunks[-1]
        return start, start + len(chunk) - 1

    def predict_batch(self, batch: dict, generator=None, **kwargs) -> np.ndarray:
        """``policy.predict`` on windows ``{key: array (B, To, ...)}`` (from :meth:`history_batch`)
        -> chunks ``(B, H, Da)`` numpy, timed into :attr:`latencies_ms`. ``kwargs`` go to
        ``predict`` (``prefix``...). Safe to call from a worker thread."""
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in batch.items()}
        B = len(next(iter(batch.values())))
        return self._call_policy(self.policy.predict, tensors, B, generator, kwargs)

    def _call_policy(self, fn, tensors: dict, B: int, generator, kwargs: dict,
                     inference_mode: bool = True) -> np.ndarray:
        """``fn(tensors, num_steps, generator, **kwargs)`` timed and checked. ``inference_mode=False``
        for samplers that differentiate through the network (guided inpainting)."""
        t0 = time.perf_counter()
        with torch.inference_mode() if inference_mode else torch.no_grad():
            out = fn(tensors, num_steps=self.num_inference_steps, generator=generator, **kwargs)
            out = out.detach().float().cpu().numpy() if torch.is_tensor(out) else np.asarray(out)
        self.latencies_ms.append((time.perf_counter() - t0) * 1e3)
        self.batch_sizes.append(B)
        if out.ndim != 3 or out.shape[:2] != (B, self.horizon):
            raise ValueError(f"policy.predict returned shape {out.shape}, expected "
                             f"({B}, H={self.horizon}, Da)")
        return out

    def _needs_plan(self, st: _EnvState) -> bool:
        return not st.chunks or st.step - st.chunks[-1][0] >= self.n_action_steps

    def _plan(self, ids: list) -> None:
        """Predict chunks for environments ``ids``.

        Those sharing the common generator go in one batched call. Those with their own generator
        go in one call with the list of generators when the policy accepts that (diffusers'
        ``randn_tensor`` draws row ``b`` from ``generator[b]``), else one call each; either way
        a row's noise comes from its own generator only.
        """
        shared = [i for i in ids if self._envs[i].generator is None]
        own = [i for i in ids if self._envs[i].generator is not None]
        groups = [(shared, self.generator)] if shared else []
        if len(own) > 1 and self._generator_lists is not False:
            gens = [self._envs[i].generator for i in own]
            states = [g.get_state() for g in gens]
            try:
                chunks = self._predict(own, gens)
                self._generator_lists = True
                self._store(own, chunks)
                own = []
            except (TypeError, ValueError, RuntimeError):
                if self._generator_lists:  # lists worked before: this is a real error
                    raise
                self._generator_lists = False
                for g, st in zip(gens, states):
                    g.set_state(st)
        groups += [([i], self._envs[i].generator) for i in own]
        for rows, gen in groups:
            self._store(rows, self._predict(rows, gen))

    def _store(self, rows: list, chunks: np.ndarray) -> None:
        for row, i in enumerate(rows):  # chunks (B, H, Da); the executed part starts at To-1
            self.add_chunk(i, chunks[row], self._envs[i].step)

    def _predict(self, rows: list, generator) -> np.ndarray:
        # (B, To, ...) in raw units; images stay uint8 for the policy's normalizer
        return self.predict_batch(self.history_batch(rows), generator)

    def _add_chunk(self, st: _EnvState, exec_part: np.ndarray, start: int) -> None:
        """Store the executable part (chunk[To-1:], acting from step ``start`` on)."""
        exec_part = exec_part.astype(np.float64)
        if self.smoothing == "blend" and st.chunks:
            prev_start, prev = st.chunks[-1]
            old = prev[max(0, start - prev_start):]  # previous plan's predictions for steps >= start
            exec_part = blend_chunks(old[:len(exec_part)], exec_part)
        if self.smoothing != "ensemble":
            st.chunks.clear()  # only the newest plan is executed
        st.chunks.append((start, exec_part))

    # ------------------------------------------------------------------------------ metrics
    def latency_stats(self) -> dict:
        """p50/p99/mean of the predict calls so far, in milliseconds."""
        if not self.latencies_ms:
            return {"latency_p50_ms": None, "latency_p99_ms": None, "latency_mean_ms": None,
                    "predict_calls": 0}
        lat = np.asarray(self.latencies_ms)
        return {"latency_p50_ms": float(np.percentile(lat, 50)),
                "latency_p99_ms": float(np.percentile(lat, 99)),
                "latency_mean_ms": float(lat.mean()), "predict_calls": int(len(lat))}


def _policy_device(policy) -> torch.device:
    try:
        return next(iter(policy.parameters())).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")
