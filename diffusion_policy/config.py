"""Typed configuration for every job.

The YAML files under ``configs/`` are checked against these dataclasses through hydra's
ConfigStore: each group file (``configs/method/ddpm.yaml`` ...) starts from the schema of its group
(``defaults: [ddpm_schema, _self_]``), so a misspelt key or a wrong type fails with the key's name.
Derived values (input sizes, the ``Ta`` limit) are computed in Python by :func:`check_horizons` and
the builders, never inside YAML.

Vocabulary (DESIGN.md): ``To`` = ``n_obs_steps``, ``H`` = ``horizon``, ``Ta`` = ``n_action_steps``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# Seeds. Collection, selection (rollouts during training) and evaluation draw from disjoint ranges,
# so a policy is never judged on the initial states its demonstrations came from.
COLLECT_SEED_BASE = 0  # dp-collect: episode i uses seed COLLECT_SEED_BASE + seed + i
SELECT_SEED_BASE = 500_000  # rollouts inside dp-train (checkpoint selection)
EVAL_SEED_BASE = 1_000_000  # dp-eval: episode i uses seed EVAL_SEED_BASE + seed + i
SEED_RANGE = 500_000  # each range holds this many seeds


# ----------------------------------------------------------------------------------------- task
@dataclass
class TaskConfig:
    """A task: an environment, what the policy observes and the chunking of its actions."""

    name: str = MISSING
    """Short name, also the folder under ``rollouts/``."""
    env_id: str = MISSING
    """Gymnasium id (``dp/PushT-v0``) or any registered id of a peer suite."""
    env_kwargs: dict = field(default_factory=dict)
    """Keyword arguments for ``gymnasium.make`` (e.g. ``obs_mode: keypoints``)."""
    obs_keys: list = field(default_factory=list)
    """Observation keys the policy conditions on; each is a key of the store and of the env's
    Dict observation."""
    image_keys: list = field(default_factory=list)
    """The subset of ``obs_keys`` that are images, stored as uint8 ``(N, H, W, 3)``."""
    action_key: str = "action"
    """Key of the action array in the store."""
    horizon: int = 16
    """``H``: length of the predicted action chunk."""
    n_obs_steps: int = 2
    """``To``: observation steps the policy conditions on."""
    n_action_steps: int = 8
    """``Ta``: actions executed before replanning; ``Ta <= H - To + 1``."""
    max_episode_steps: int = 300
    """Episode length limit during evaluation."""
    expert: str = ""
    """Name of the scripted expert in ``envs.experts`` ('' = none)."""
    fps: float = 10.0
    """Control rate, used for videos and the deploy loop."""


def check_horizons(horizon: int, n_obs_steps: int, n_action_steps: int) -> None:
    """Raise if ``To``, ``H`` and ``Ta`` are inconsistent (executed actions start at index To-1)."""
    if n_obs_steps < 1:
        raise ValueError(f"n_obs_steps={n_obs_steps} (To) must be >= 1")
    if n_action_steps < 1:
        raise ValueError(f"n_action_steps={n_action_steps} (Ta) must be >= 1")
    if n_action_steps > horizon - n_obs_steps + 1:
        raise ValueError(
            f"n_action_steps={n_action_steps} (Ta) must be <= horizon - n_obs_steps + 1 "
            f"(H={horizon}, To={n_obs_steps}: at most {horizon - n_obs_steps + 1}), because the first "
            f"executed action is chunk index To-1"
        )


# --------------------------------------------------------------------------------------- policy
@dataclass
class ObsEncoderConfig:
    """How observations become the condition ``(B, To, F)``."""

    crop_ratio: float = 0.875
    """Images: random crop of this fraction of each side in training, center crop in evaluation
    (84 of 96 as in Chi et al.). 1.0 disables cropping."""
    share_rgb_model: bool = False
    """One image backbone for every camera (True) or one per camera (False)."""
    image_feature_dim: int = 64
    """Features per camera after the spatial-softmax head (2 x keypoints)."""
    backbone_width: int = 64
    """Channels of the first ResNet-18 stage (64 = the standard ResNet-18)."""


@dataclass
class PolicyConfig:
    """Denoising network. ``name`` selects the architecture; fields of the other one are ignored."""

    name: str = MISSING
    """``unet`` (conditional 1D temporal UNet), ``transformer`` or ``mlp`` (regression baseline)."""
    # UNet
    down_dims: list = field(default_factory=lambda: [256, 512, 1024])
    """UNet channels per level; the chunk is halved in time len(down_dims)-1 times."""
    kernel_size: int = 5
    """UNet: temporal kernel of every convolution (odd; 5 in Chi et al.)."""
    n_groups: int = 8
    """GroupNorm groups (UNet); every level's channels must be divisible by it."""
    time_embed_dim: int = 256
    """Sinusoidal time embedding size (UNet and transformer)."""
    # transformer
    n_layer: int = 8
    """Transformer: decoder layers."""
    n_head: int = 4
    """Transformer: attention heads; ``n_emb`` must be divisible by it."""
    n_emb: int = 256
    """Transformer: token width."""
    p_drop: float = 0.0
    """Transformer: dropout probability in attention and MLP blocks."""
    # mlp
    hidden_dims: list = field(default_factory=lambda: [512, 512, 512])
    """MLP: widths of the hidden layers."""
    obs_encoder: ObsEncoderConfig = field(default_factory=ObsEncoderConfig)
    """How observations become the condition (images: backbone and crop)."""


# --------------------------------------------------------------------------------------- method
@dataclass
class MethodConfig:
    """Generative method. ``name`` selects the family: ``diffusion`` (diffusers' schedulers),
    ``flow`` (flow matching) or ``regression`` (MSE, the behaviour-cloning baseline)."""

    name: str = MISSING
    """``diffusion``, ``flow`` or ``regression``."""
    # diffusion
    scheduler: str = "ddpm"
    """Diffusion sampler: ``ddpm``, ``ddim`` or ``dpmsolver`` (DPM-Solver++)."""
    num_train_timesteps: int = 100
    """Diffusion: steps of the forward (noising) process ``T``."""
    beta_schedule: str = "squaredcos_cap_v2"
    """``linear``, ``scaled_linear`` or ``squaredcos_cap_v2``."""
    prediction_type: str = "epsilon"
    """``epsilon``, ``sample`` or ``v_prediction``."""
    clip_sample: bool = True
    """Diffusion: clip the predicted clean chunk to [-1, 1] at every step (normalized units);
    ``dpmsolver`` cannot clip."""
    # flow matching
    time_dist: str = "beta"
    """Training time distribution: ``uniform``, ``logit_normal`` or ``beta`` (pi0: Beta(1.5, 1))."""
    integrator: str = "euler"
    """``euler``, ``midpoint`` or ``heun``."""
    # both
    num_inference_steps: int = 100
    """Sampler steps (diffusion: <= num_train_timesteps; flow: integration steps)."""


# ----------------------------------------------------------------------------------------- jobs
@dataclass
class CollectConfig:
    """``dp-collect``: record a task's scripted expert into a Zarr episode store."""

    task: TaskConfig = MISSING
    """The task whose expert is recorded (``task=<name>``)."""
    episodes: int = 100
    """Successful episodes wanted in the store; re-running appends until there are this many."""
    out: str = MISSING
    """Path of the Zarr store to create or append to."""
    seed: int = 0
    """Offset into the collection seed range."""
    workers: int = 0
    """Parallel worker processes (0 = one per CPU core)."""
    max_attempts_factor: float = 3.0
    """Give up after episodes x this many attempts."""
    dart_noise: float = 0.0
    """DART (Laskey et al., 2017): the standard deviation of Gaussian noise added to the expert's
    action before it is executed, as a fraction of each action dimension's range (high - low of
    the env's action space; 0.02 on Push-T = 1 cm). The store's ``action`` is the clean expert
    action, ``action_executed`` the perturbed one the env received. 0 = off."""
    dart_episodes: float = 1.0
    """With ``dart_noise > 0``: the fraction of episodes that are perturbed (each attempt draws it
    from its seed); the others are clean, with ``action_executed`` equal to ``action``."""


@dataclass
class TrainConfig:
    """``dp-train``: train a policy from a store of demonstrations."""

    task: TaskConfig = MISSING
    """The task: observation keys, chunking (``task=<name>``)."""
    policy: PolicyConfig = MISSING
    """The denoising network (``policy=<name>``)."""
    method: MethodConfig = MISSING
    """The generative method (``method=<name>``)."""
    data: str = MISSING
    """Path of the Zarr store of demonstrations."""
    run_dir: str = ""
    """Where checkpoints and logs go ('' = runs/<task>/<date-time>)."""
    resume: bool = False
    """Continue the run in ``run_dir`` from its ``latest`` checkpoint."""
    device: str = "auto"
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto``."""
    seed: int = 0
    """Seeds the initial weights, the episode split, the batch order and the training noise."""
    batch_size: int = 256
    """Global batch size (split across ranks under torchrun)."""
    steps: int = 100_000
    """Optimizer steps."""
    lr: float = 1e-4
    """AdamW peak learning rate (after warm-up)."""
    betas: list = field(default_factory=lambda: [0.95, 0.999])
    """AdamW betas (Chi et al.: 0.95, 0.999)."""
    weight_decay: float = 1e-6
    """AdamW weight decay."""
    warmup_steps: int = 500
    """Linear learning-rate warm-up, then cosine decay to zero at ``steps``."""
    grad_clip: float = 1.0
    """Gradient norm clip."""
    ema: bool = True
    """Keep an exponential moving average of the weights; checkpoints and rollouts use it."""
    ema_power: float = 0.75
    """EMA warm-up: decay = 1 - (1 + step) ** -ema_power."""
    ema_max_decay: float = 0.9999
    """EMA decay cap."""
    bf16: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""
    compile: bool = False
    """``torch.compile`` the training loss (the first steps compile)."""
    data_on_device: bool = True
    """Low-dimensional data: keep the whole dataset on the device."""
    val_ratio: float = 0.05
    """Fraction of episodes held out for the validation loss (at least one if > 0)."""
    max_train_episodes: Optional[int] = None
    """Train on a random subset of this many training episodes (None = all; data scaling)."""
    log_every: int = 100
    """Steps between training-loss log lines."""
    val_every: int = 1000
    """Steps between validation losses."""
    eval_every: int = 0
    """Rollout evaluation every this many steps (0 = never)."""
    eval_episodes: int = 20
    """Episodes of each rollout evaluation, on the selection seeds."""
    checkpoint_every: int = 1000
    """Steps between checkpoints (and one at the end, and one after each rollout evaluation)."""
    topk: int = 3
    """Checkpoints kept by rollout score, besides the newest."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the wandb package)."""
    ddp_comm: str = "fp32"
    """Under torchrun only: dtype of the gradient all-reduce. ``fp32`` (DDP's default) or ``bf16``
    (CUDA only; DDP's bf16_compress_hook: gradients are cast to bf16, summed and cast back, half
    the bytes on the wire; the optimizer still sees fp32 gradients)."""
    ddp_bucket_mb: int = 25
    """Under torchrun only: DDP's ``bucket_cap_mb``, the size of the gradient buckets that are
    all-reduced while backward runs (fewer, larger calls vs less overlap with backward)."""


DDP_COMMS = ("fp32", "bf16")


@dataclass
class EvalConfig:
    """``dp-eval``: roll a checkpoint (or a task's scripted expert) out in simulation."""

    checkpoint: str = MISSING
    """A checkpoint directory (or a run directory: its ``latest``), or ``expert`` for the scripted
    expert of ``task``."""
    task: Optional[Any] = None
    """Only for ``checkpoint=expert``: the task config."""
    episodes: int = 50
    """Episodes to run."""
    seed: int = 0
    """Offset into the evaluation seed range."""
    out: str = ""
    """Output folder ('' = rollouts/<task>/<checkpoint name>)."""
    n_envs: int = 0
    """Parallel environments (0 = one per CPU core)."""
    videos: int = 4
    """Videos of the first K episodes."""
    device: str = "auto"
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto``."""
    num_inference_steps: Optional[int] = None
    """Override the sampler's steps."""
    max_episode_steps: Optional[int] = None
    """Override the task's episode length limit."""
    smoothing: str = "none"
    """Across action chunks: ``none``, ``ensemble`` (ACT temporal ensembling) or ``blend`` (ramp
    the overlap of the old chunk into the new one); see diffusion_policy/control/controller.py."""
    ensemble_k: float = 0.01
    """Temporal ensembling weight ``exp(-k i)``, ``i = 0`` the oldest prediction (ACT)."""
    episode_generators: bool = True
    """One sampler generator per episode, seeded with its env seed: results do not depend on
    ``n_envs`` or ranks, but environments replanning together share a ``predict`` call only if the
    method accepts a list of generators (else one call each). False: one shared generator and
    batched calls, reproducible only for the same ``n_envs`` and ranks."""
    bf16: bool = False
    """Sample with a bf16 copy of the denoiser (diffusion_policy/inference.py, FastPredictor)."""
    compile: bool = False
    """``torch.compile`` the denoiser's sampling path (the first chunk compiles: seconds to a
    minute)."""
    cuda_graph: bool = False
    """Replay each chunk's whole ``predict`` from a CUDA graph (CUDA only); calls are padded to
    ``n_envs`` rows so that one graph serves every batch."""


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(group="task", name="task_schema", node=TaskConfig)
    cs.store(group="policy", name="policy_schema", node=PolicyConfig)
    cs.store(group="method", name="method_schema", node=MethodConfig)
    cs.store(name="collect_schema", node=CollectConfig)
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="serve_schema", node=ServeConfig)
    cs.store(name="deploy_schema", node=DeployConfig)


# ------------------------------------------------------------------------------- composition
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and what was expected."""


def compose(config_name: str, overrides: Sequence[str] = ()) -> Any:
    """Compose ``configs/<config_name>.yaml`` with command-line style overrides (``key=value``)
    and return the typed dataclass (TrainConfig, EvalConfig, ...). Raises ConfigError for an
    unknown key or a wrong type; the rules between values (``Ta <= H - To + 1``, a UNet's
    horizon, a sampler's steps) are checked by :func:`diffusion_policy.validation.validate`,
    which every job runs first."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
        obj = OmegaConf.to_object(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(" ".join(str(e).split())) from None
    return obj


def as_dict(cfg: Any) -> dict:
    """A plain, JSON-able dict of a config dataclass, a DictConfig or a dict (for checkpoints and
    run folders)."""
    from dataclasses import is_dataclass

    from omegaconf import OmegaConf

    node = OmegaConf.structured(cfg) if is_dataclass(cfg) else OmegaConf.create(cfg)
    return OmegaConf.to_container(node, resolve=True)


def typed(schema: type, d: dict) -> Any:
    """A dict back to its dataclass, checked against the schema: an unknown key or a wrong type
    raises ConfigError naming it (a checkpoint's config.json, for instance)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), d))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{schema.__name__}: {' '.join(str(e).split())}") from None


def run_cli(prog: str, config_name: str, job, argv: Sequence[str] | None, doc: str,
            errors: tuple = (), interrupted: str = "") -> int:
    """The body of every hydra-style console entry point (``dp-collect``, ``dp-train``,
    ``dp-eval``): compose ``configs/<config_name>.yaml`` with ``argv`` overrides, run ``job(cfg)``,
    and turn a bad config or any of ``errors`` into one line on stderr and exit status 2."""
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(doc)
        return 0
    try:
        job(compose(config_name, argv))
    except (ConfigError, *errors) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{'; ' + interrupted if interrupted else ''}", file=sys.stderr)
        return 130
    return 0


# ----------------------------------------------------------------------------------- dp-serve
@dataclass
class ServeConfig:
    """``dp-serve``: a policy served to robot clients over websockets (diffusion_policy/serving/)."""

    checkpoint: str = MISSING
    """A run directory (its ``latest``), a checkpoint directory, a policy directory or a pointer
    file such as ``<run>/checkpoints/best``."""
    host: str = "127.0.0.1"
    """Interface to listen on. Loopback by default; ``0.0.0.0`` (all interfaces) without a token
    is allowed but warned about loudly."""
    port: int = 8765
    """TCP port (0 = any free port, printed at start)."""
    token: str = ""
    """Shared secret every client must present at the handshake ('' = none; the environment
    variable ``DP_SERVE_TOKEN`` is used when this is empty, which keeps it off the command line)."""
    device: str = "auto"
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available)."""
    max_message_bytes: int = 16 * 2**20
    """Largest message accepted or sent, checked before decoding; larger ones get an error reply
    (and above twice this the connection is dropped unread)."""
    max_clients: int = 8
    """Connections served at once; one more is told ``server_full`` and closed."""
    handshake_timeout_s: float = 10.0
    """A connection that sends no ``hello`` within this is closed."""
    bf16: bool = True
    """CUDA only: sample with a bf16 copy of the denoiser (FastPredictor)."""
    fused: bool = True
    """CUDA only, UNet policies: the fused Triton sampling path for batches of 1-2 (FastPredictor)."""
    compile: bool = False
    """``torch.compile`` the denoiser's sampling path (CPU or CUDA; the first chunk compiles)."""
    warmup: bool = True
    """Run one chunk before accepting connections, so compilation and CUDA graph capture are not
    paid by the first robot request."""


# ---------------------------------------------------------------------------------- dp-deploy
@dataclass
class DeployConfig:
    """``dp-deploy``: a policy in the real-time loop on a robot (diffusion_policy/control/realtime.py)."""

    checkpoint: str = ""
    """A run, checkpoint or policy directory (``policy=local``); unused with ``policy=remote``."""
    policy_source: str = "local"
    """``local`` (run the checkpoint in this process) or ``remote`` (a ``dp-serve`` at ``url``). On the
    command line ``policy=remote`` says the same (``dp-deploy`` rewrites it: ``policy`` is also the
    name of the network config group, which hydra would look for)."""
    url: str = "ws://127.0.0.1:8765"
    """``policy=remote``: the server."""
    token: str = ""
    """``policy=remote``: the server's shared token ('' = the environment variable ``DP_SERVE_TOKEN``,
    or none)."""
    timeout_s: float = 2.0
    """``policy=remote``: deadline of each request (the watchdog's ``chunk_deadline_s`` still holds)."""
    robot: str = "sim"
    """``sim``: the task's simulated robot (control/sim_robot.py). A real robot is an adapter of the
    ``Robot`` protocol (control/robot.py) passed to :func:`diffusion_policy.deploy.deploy`."""
    task: Optional[Any] = None
    """The task config (``task=<name>``); default: the checkpoint's own task."""
    frequency: float = 0.0
    """Control rate of the loop in Hz (0 = the task's ``fps``)."""
    episodes: int = 1
    """Episodes to run (the simulated robot resets between them)."""
    seed: int = 0
    """Offset into the evaluation seed range: episode ``i`` uses env seed ``EVAL_SEED_BASE + seed + i``
    and a sampler generator seeded with it, as ``dp-eval`` does."""
    max_steps: Optional[int] = None
    """Control steps per episode (default: the task's ``max_episode_steps``)."""
    clock: str = "wall"
    """``wall`` (real time; the robot and inference in threads) or ``sim`` (virtual time: exact,
    reproducible, as fast as the computer; latencies are injected)."""
    mode: str = "async"
    """``async`` (inference while the robot moves) or ``sync`` (predict, then execute: the naive loop)."""
    transition: str = "none"
    """How a new chunk takes over: ``none``, ``ensemble``, ``blend``, ``replace`` (committed actions
    inpainted by replacement) or ``rtc`` (real-time chunking: guided inpainting with a soft mask)."""
    ensemble_k: float = 0.01
    """``transition=ensemble``: ACT's weight ``exp(-k i)``, ``i = 0`` the oldest prediction."""
    replan_every: Optional[int] = None
    """Observation steps between inference requests (default: the policy's ``Ta``)."""
    action_margin_s: float = 0.01
    """Actions due sooner than this when their chunk arrives are dropped (Chi et al.: 10 ms)."""
    num_inference_steps: Optional[int] = None
    """Sampler steps (default: the checkpoint's)."""
    inference: str = "auto"
    """``eager`` (Policy.predict), ``compile`` (FastPredictor(compile=True), CPU or CUDA), ``fast``
    (CUDA: FastPredictor bf16 + fused + CUDA graph) or ``auto`` (``fast`` on CUDA, ``compile`` on CPU)."""
    device: str = "auto"
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto``."""
    max_guidance: float = 5.0
    """``transition=rtc``: the guidance weight's clip (beta of Black et al. 2025, eq. 2)."""
    sim_rate_hz: float = 100.0
    """Simulated robot: rate of its servo ticks (a whole multiple of the control rate)."""
    obs_latency_ms: Any = 0.0
    """Simulated robot: observation latency, one number or ``{key: ms}`` per observation key (camera)."""
    obs_jitter_ms: float = 0.0
    """Simulated robot: extra observation delay, uniform in [0, this]."""
    act_latency_ms: float = 0.0
    """Simulated robot: delay from a command to the robot's controller."""
    act_jitter_ms: float = 0.0
    """Simulated robot: extra actuation delay, uniform in [0, this]."""
    inference_latency_ms: Optional[float] = None
    """Injected inference latency: with ``clock=sim`` the virtual time a chunk takes (None = the
    measured time); with ``clock=wall`` added to the measured time (None = nothing added)."""
    inference_jitter_ms: float = 0.0
    """Extra injected inference latency, uniform in [0, this]."""
    max_delta: Optional[Any] = None
    """Safety: largest change of an action per control step, one number or one per dimension
    (None = no rate limit)."""
    workspace_low: Optional[list] = None
    """Safety: lower corner of the workspace box on the first dimensions of the action (None = none)."""
    workspace_high: Optional[list] = None
    """Safety: upper corner of the workspace box."""
    obs_deadline_s: float = 0.5
    """Safety: hold when the newest observation is older than this."""
    chunk_deadline_s: float = 1.0
    """Safety: hold when a requested chunk has not arrived within this."""
    max_faults: int = 10
    """Safety: stop after this many faulty control ticks in a row."""
    out: str = ""
    """Output folder: ``episodes.zarr`` (the log), ``episodes.jsonl``, ``events.jsonl``, ``summary.json``
    ('' = rollouts/deploy/<task>/<checkpoint name>)."""
    status_every_s: float = 1.0
    """Seconds of clock time between status lines (0 = only the summary)."""
