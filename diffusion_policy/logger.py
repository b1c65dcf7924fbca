"""Metric logging for training: TensorBoard event files, a JSONL line per logged step, and
Weights & Biases only when it is installed and asked for."""
from __future__ import annotations

import json
from pathlib import Path


class Logger:
    def __init__(self, run_dir: Path, use_wandb: bool = False, config: dict | None = None,
                 resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        path = self.run_dir / "metrics.jsonl"
        if resume_step is not None and path.exists():
            # a killed run may have logged past its last checkpoint: keep the lines up to it, so the
            # resumed curve joins the old one instead of overlapping it
            lines = [l for l in path.read_text().splitlines() if l and json.loads(l)["step"] <= resume_step]
            path.write_text("".join(l + "\n" for l in lines))
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step drops events a killed run logged after its last checkpoint
            self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=resume_step)
        except ImportError:  # tensorboard is a dependency, but logging must never stop training
            self.tb = None
        self.wandb = None
        if use_wandb:
            try:
                import wandb
            except ImportError:
                from diffusion_policy.config import ConfigError

                raise ConfigError("wandb=true but the wandb package is not installed (pip install wandb)") from None
            self.wandb = wandb.init(project="diffusion-policy", dir=str(self.run_dir), config=config,
                                    name=self.run_dir.name, resume="allow")

    def log(self, step: int, metrics: dict) -> None:
        clean = {k: float(v) for k, v in metrics.items()}
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        if self.tb is not None:
            for k, v in clean.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(clean, step=step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
