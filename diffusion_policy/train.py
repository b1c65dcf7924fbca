"""dp-train: one training loop for every network x method pair, from a CPU to many GPUs.

    dp-train task=avoid data=data/avoid.zarr policy=unet_small method=ddpm steps=2000
    torchrun --nproc_per_node=2 -m diffusion_policy.train task=pusht data=... device=cuda

Read top to bottom: set-up (ranks, data, policy, optimizer, EMA), resume, the loop (train step,
logging, validation, rollouts, checkpoints). Under torchrun every rank runs this same file with
DDP: ``batch_size`` is the *global* batch, each rank draws ``batch_size / world_size`` windows from
its own shard of one shared permutation, metrics are all-reduced and only rank 0 writes.
"""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from diffusion_policy import checkpoint as ckpt
from diffusion_policy.config import ConfigError, TrainConfig, as_dict, run_cli
from diffusion_policy.data.batches import EpochBatches
from diffusion_policy.data.integrity import check_store
from diffusion_policy.data.normalize import Normalizer
from diffusion_policy.data.store import EpisodeStore, StoreError
from diffusion_policy.data.windows import WindowDataset, WindowSampler, split_episodes
from diffusion_policy.distributed import rank_world, resolve_device
from diffusion_policy.logger import Logger
from diffusion_policy.policy import Policy
from diffusion_policy.validation import validate


# ------------------------------------------------------------------------------------ helpers
def ema_decay(step: int, power: float, max_decay: float) -> float:
    """EMA warm-up as in Chi et al. (power 0.75): decay = 1 - (1 + step)^-power, capped."""
    if step <= 0:
        return 0.0
    return min(max_decay, max(0.0, 1.0 - (1.0 + step) ** -power))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    # one fused call over all parameters: a loop of per-tensor lerps is hundreds of kernel
    # launches per step, which costs more than the update itself for these small networks
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    for e, m in zip(ema.buffers(), model.buffers()):
        e.copy_(m)


def adamw_kwargs(device: torch.device) -> dict:
    """AdamW's implementation for ``device``: fused on CUDA (one kernel for all parameters),
    foreach elsewhere (a few multi-tensor kernels). A step of these networks is bound by kernel
    launches on the host, and the per-parameter loop would be hundreds of them."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def lr_lambda(warmup: int, total: int):
    """Linear warm-up, then cosine decay to zero (the schedule of Chi et al.)."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


class LossModule(torch.nn.Module):
    """What DDP wraps: forward() is the policy's training loss, so gradients are synchronized."""

    def __init__(self, policy: Policy):
        super().__init__()
        self.policy = policy

    def forward(self, batch: dict) -> torch.Tensor:
        return self.policy.compute_loss(batch)


# --------------------------------------------------------------------------------------- train
def train(cfg: TrainConfig) -> dict:
    """Train a policy; returns {'run_dir', 'step', 'train_loss', 'val_loss', 'best'}."""
    validate(cfg)
    # ---- ranks and device
    rank, world, local_rank = rank_world()
    device = resolve_device(cfg.device, local_rank)
    try:  # before any collective call, like the checks below
        EpochBatches.check_batch_size(cfg.batch_size, world)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if world > 1 and cfg.ddp_comm == "bf16" and device.type != "cuda":
        raise ConfigError(f"ddp_comm=bf16 needs CUDA devices (DDP's bf16_compress_hook runs on NCCL); "
                          f"this run is on {device.type}: use ddp_comm=fp32")
    is_main = rank == 0

    # every rank checks before any collective call, so a bad run_dir fails on all of them at once
    # (rank 0 cannot have written anything yet: it waits in init_process_group for the others)
    run_dir = Path(cfg.run_dir or f"runs/{cfg.task.name}/{datetime.now():%Y%m%d-%H%M%S}")
    if cfg.resume and not ckpt.has_latest(run_dir):
        raise ConfigError(f"resume=true but {run_dir} has no checkpoint to resume from "
                          f"(expected {run_dir}/checkpoints/latest); pass run_dir=<an earlier run>")
    if not cfg.resume and ckpt.has_latest(run_dir):
        raise ConfigError(f"run_dir {run_dir} already holds a run; pass resume=true to continue it "
                          f"or choose another run_dir")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    np.random.seed(cfg.seed + rank)

    # ---- data: episodes split by a seed, normalizer fitted on the training episodes only
    task = cfg.task
    store = EpisodeStore.open(cfg.data, cache_images=bool(task.image_keys))  # images: in memory
    from diffusion_policy.collect import check_store_task  # the store's env version is the task's

    check_store_task(cfg.data, task)
    check_store(store, keys=[*task.obs_keys, task.action_key], min_episodes=1)  # damaged chunks, NaN/inf
    keys = list(task.obs_keys) + [task.action_key]
    missing = [k for k in keys if k not in store.keys()]
    if missing:
        raise ConfigError(f"{cfg.data}: task {task.name} needs keys {missing}, "
                          f"the store has {sorted(store.keys())}")
    train_ids, val_ids = split_episodes(store.n_episodes, cfg.val_ratio, cfg.seed, cfg.max_train_episodes)
    arrays = {k: store[k] for k in keys}
    sampler_kw = dict(horizon=task.horizon, n_obs_steps=task.n_obs_steps, n_action_steps=task.n_action_steps)
    train_sampler = WindowSampler(store.episode_ends, episodes=train_ids, **sampler_kw)
    if len(train_sampler) == 0:
        raise ConfigError(f"{cfg.data}: no training windows: the {len(train_ids)} training episodes are "
                          f"all shorter than the window (horizon {task.horizon}); collect longer "
                          f"episodes or lower task.horizon")
    place = dict(seed=cfg.seed, device=device, rank=rank, world=world)
    train_batches = EpochBatches(WindowDataset(arrays, train_sampler, task.obs_keys, task.action_key),
                                 cfg.batch_size, on_device=cfg.data_on_device and not task.image_keys, **place)
    val_batches = None
    if len(val_ids):
        val_sampler = WindowSampler(store.episode_ends, episodes=val_ids, **sampler_kw)
        val_batches = EpochBatches(WindowDataset(arrays, val_sampler, task.obs_keys, task.action_key),
                                   cfg.batch_size, **place)

    # ---- policy, EMA, optimizer, schedule
    if cfg.resume:
        saved = ckpt.load_training(run_dir, device)
        policy = saved.policy
        _check_same_model(cfg, saved.config, run_dir)
    else:
        rows = [store.episode_slice(int(e)) for e in train_ids]  # statistics of training episodes only
        fit_arrays = {k: np.concatenate([np.asarray(arrays[k][r]) for r in rows]) for k in keys
                      if k not in task.image_keys}
        modes = {k: "minmax" for k in fit_arrays} | {k: "image" for k in task.image_keys}
        normalizer = Normalizer.fit(fit_arrays, modes)
        shapes = {k: tuple(store[k].shape[1:]) for k in task.obs_keys}
        action_dim = int(store[task.action_key].shape[-1])
        policy = Policy.build(task, cfg.policy, cfg.method, normalizer, shapes, action_dim)
    policy.to(device)
    ema = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.ema else None
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                  weight_decay=cfg.weight_decay, **adamw_kwargs(device))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.steps))
    state = ckpt.TrainingState(policy, ema, optimizer, scheduler)

    loss_module = LossModule(policy)
    if world > 1:
        # DDP broadcasts rank 0's weights (and buffers) once here; gradient_as_bucket_view:
        # gradients live in the all-reduce buckets (no copy in and out); broadcast_buffers=False:
        # the only buffers are the normalizer's statistics, constant during training, so the
        # default re-broadcast before every forward is a collective per step for nothing
        loss_module = torch.nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True, bucket_cap_mb=cfg.ddp_bucket_mb, broadcast_buffers=False)
        if cfg.ddp_comm == "bf16":
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

            loss_module.register_comm_hook(None, bf16_compress_hook)  # None: the default group
        if ema is not None:
            ema.load_state_dict(policy.state_dict())  # the EMA starts from the broadcast weights
    if cfg.resume:
        state.restore(saved)
        if is_main:
            print(f"resumed {run_dir} at step {state.step}", flush=True)
    step = state.step
    if rank > 0 or not cfg.resume:
        # training noise: a distinct stream per rank (only rank 0's generator is saved; the others
        # restart from a seed that depends on the step, so a resumed run draws fresh noise)
        torch.manual_seed(cfg.seed + 1000 * step + rank)
    loss_fn = torch.compile(loss_module) if cfg.compile else loss_module
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")

    logger = None
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(as_dict(cfg), indent=2))
        logger = Logger(run_dir, use_wandb=cfg.wandb, config=as_dict(cfg),
                        resume_step=step if cfg.resume else None)
        n_params = sum(p.numel() for p in policy.parameters())
        print(f"run {run_dir}: {store.n_episodes} episodes ({len(train_ids)} train, {len(val_ids)} val), "
              f"{len(train_batches)} windows, {n_params / 1e6:.2f}M parameters, device {device}, "
              f"{world} rank(s), global batch {cfg.batch_size}"
              + (f", DDP {cfg.ddp_comm} all-reduce in {cfg.ddp_bucket_mb} MiB buckets" if world > 1 else ""),
              flush=True)

    # ---- the loop
    from tqdm import tqdm
    bar = tqdm(total=cfg.steps, initial=step, disable=not is_main, dynamic_ncols=True, desc="train",
               mininterval=0.5 if sys.stderr.isatty() else 30.0)  # logs get a line every 30 s
    t_last, n_last = time.perf_counter(), step
    # host seconds since the last log in each phase, for train/{data,fwd_bwd,opt}_ms. No device
    # synchronisation is added: on CUDA a phase's time is the host's time to enqueue its kernels,
    # plus any wait for the device inside it. Their sum against train/step_ms (wall time, which
    # ends in the loss all-reduce that waits for the device) says whether the host is the bound.
    t_data = t_fwd_bwd = t_opt = 0.0
    train_loss = val_loss = float("nan")
    policy.train()
    while step < cfg.steps:
        t0 = time.perf_counter()
        batch = train_batches.batch(step)
        t1 = time.perf_counter()
        with autocast:
            loss = loss_fn(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        state.step += 1
        step = state.step
        if ema is not None:
            ema_update(ema, policy, ema_decay(step, cfg.ema_power, cfg.ema_max_decay))
        t3 = time.perf_counter()
        t_data, t_fwd_bwd, t_opt = t_data + (t1 - t0), t_fwd_bwd + (t2 - t1), t_opt + (t3 - t2)

        if step % cfg.log_every == 0 or step == cfg.steps:
            train_loss = _mean_across_ranks(loss.detach(), world)
            now = time.perf_counter()
            n = step - n_last
            sps = n * cfg.batch_size / (now - t_last)
            timing = {"train/step_ms": 1e3 * (now - t_last) / n, "train/data_ms": 1e3 * t_data / n,
                      "train/fwd_bwd_ms": 1e3 * t_fwd_bwd / n, "train/opt_ms": 1e3 * t_opt / n}
            t_last, n_last = now, step
            t_data = t_fwd_bwd = t_opt = 0.0
            if is_main:
                lr = scheduler.get_last_lr()[0]
                logger.log(step, {"train/loss": train_loss, "train/lr": lr, "train/grad_norm": float(grad_norm),
                                  "train/samples_per_s": sps, **timing})
                bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.1e}", sps=f"{sps:.0f}")
        bar.update(1)

        if val_batches is not None and (step % cfg.val_every == 0 or step == cfg.steps):
            val_loss = _validation_loss(ema or policy, val_batches)
            if is_main:
                logger.log(step, {"val/loss": val_loss})

        selected = None
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            metrics = _rollouts(ema or policy, task, cfg.eval_episodes, device, rank, world)
            if is_main:
                logger.log(step, {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
                selected = (metrics["success_rate"], metrics["mean_max_reward"])
                bar.write(f"step {step}: success {metrics['success_rate']:.2f} "
                          f"mean max reward {metrics['mean_max_reward']:.3f}")
            policy.train()

        if is_main and (step % cfg.checkpoint_every == 0 or step == cfg.steps or selected is not None):
            state.save(run_dir, as_dict(cfg), score=selected, k=cfg.topk)
    bar.close()
    if is_main:
        logger.close()
        print(f"done: step {step}, train loss {train_loss:.4f}, val loss {val_loss:.4f}; "
              f"checkpoint {run_dir}/checkpoints/{ckpt.read_latest(run_dir)}", flush=True)
    if world > 1:
        dist.barrier()
    return {"run_dir": str(run_dir), "step": step, "train_loss": train_loss, "val_loss": val_loss,
            "best": state.topk[0] if state.topk else None}


def _check_same_model(cfg: TrainConfig, saved: dict, run_dir) -> None:
    """A resumed run continues the saved model: overrides of its task, policy or method would be
    ignored silently, so they are an error."""
    now = as_dict(cfg)
    diff = [f"{g}.{k}" for g in ("task", "policy", "method") for k in sorted(set(now[g]) | set(saved[g]))
            if now[g].get(k) != saved[g].get(k)]
    if diff:
        raise ConfigError(f"resume=true: {run_dir} was trained with other values of {', '.join(diff)}; "
                          f"drop those overrides to continue it, or start a new run_dir")


def _mean_across_ranks(x: torch.Tensor, world: int) -> float:
    if world > 1:
        x = x.float().clone()
        dist.all_reduce(x)
        x /= world
    return float(x)


@torch.no_grad()
def _validation_loss(policy, batches: EpochBatches) -> float:
    """Mean loss over a fixed subset of validation windows (``batches.fixed()``) and a fixed noise
    draw, so successive values are comparable. Each rank takes a slice; the mean is all-reduced."""
    was_training = policy.training
    policy.eval()
    device = batches.device
    total, n = torch.zeros((), device=device), 0
    # a fixed noise draw, without disturbing the training streams (CPU and this rank's GPU)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(batches.seed)
        for batch in batches.fixed():
            rows = len(batch["action"])
            total += policy.compute_loss(batch).detach() * rows
            n += rows
    policy.train(was_training)
    out = torch.stack([total, torch.tensor(float(n), device=device)])
    if batches.world > 1:
        dist.all_reduce(out)
    return float(out[0] / out[1].clamp(min=1))


def _rollouts(policy, task, episodes, device, rank, world) -> dict:
    """Success of the current (EMA) weights on the selection seeds, which are disjoint from both
    the collection and the test seeds (selecting on test seeds would inflate reported results)."""
    from diffusion_policy.config import SELECT_SEED_BASE
    from diffusion_policy.rollout import run_episodes

    policy.eval()
    seeds = [SELECT_SEED_BASE + i for i in range(episodes)]
    return run_episodes(policy, task, seeds, device=device, rank=rank, world=world)


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Console entry point: ``dp-train key=value ...`` (hydra overrides on configs/train.yaml)."""
    try:
        return run_cli("dp-train", "train", train, argv, __doc__, errors=(StoreError,),
                       interrupted="resume with resume=true run_dir=<the run>")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
