"""``dp-serve``: serve a checkpoint's policy to robot clients over websockets.

    dp-serve checkpoint=runs/avoid/<run>                         # ws://127.0.0.1:8765, no token
    DP_SERVE_TOKEN=s3cret dp-serve checkpoint=<run> host=0.0.0.0 port=9000 device=cuda

On CUDA the policy runs through ``FastPredictor`` (a CUDA graph per request shape; bf16 and, for a
UNet, the fused sampling path unless ``bf16=false`` / ``fused=false``); on a CPU the policy itself,
compiled with ``compile=true``. The first chunk is run before the port opens (``warmup``), so no
robot request pays for compilation or graph capture.

Clients: ``diffusion_policy.serving.client.RemotePolicy("ws://host:port", token=...)``; the wire
format is described in ``diffusion_policy/serving/protocol.py``. Ctrl-C or SIGTERM stops the
server, closing every connection.
"""
from __future__ import annotations

import logging
import os
import signal
import sys

from diffusion_policy.checkpoint import CheckpointError, load_policy, resolve_checkpoint
from diffusion_policy.config import ConfigError, ServeConfig
from diffusion_policy.serving import protocol as P


def build_predictor(policy, cfg: ServeConfig):
    """What runs ``predict`` for ``cfg``: a FastPredictor on CUDA (and on a CPU when compiling),
    else the policy."""
    from diffusion_policy.inference import FastPredictor

    if policy.device.type == "cuda":
        fused = cfg.fused and FastPredictor.can_fuse(policy)
        return FastPredictor(policy, dtype="bf16" if cfg.bf16 else "fp32", compile=cfg.compile, fused=fused)
    if cfg.compile:
        return FastPredictor(policy, compile=True)
    return policy


def warm_up(policy, predictor) -> None:
    """One batch-1 chunk from an all-zero window (uint8 zeros for images)."""
    import torch

    obs = {k: torch.zeros((1, policy.n_obs_steps, *policy.shapes[k]),
                          dtype=torch.uint8 if k in policy.image_keys else torch.float32)
           for k in policy.obs_keys}
    predictor.predict(obs, generator=torch.Generator(device=policy.device).manual_seed(0))


def check(cfg: ServeConfig) -> None:
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"port={cfg.port} must be in [0, 65535]")
    if cfg.max_message_bytes < 1024:
        raise ConfigError(f"max_message_bytes={cfg.max_message_bytes} must be >= 1024")
    if cfg.max_clients < 1:
        raise ConfigError(f"max_clients={cfg.max_clients} must be >= 1")
    if cfg.handshake_timeout_s <= 0:
        raise ConfigError(f"handshake_timeout_s={cfg.handshake_timeout_s} must be > 0")


def make_server(cfg: ServeConfig):
    """Load the checkpoint and build the (unbound) :class:`PolicyServer` for ``cfg``."""
    from diffusion_policy.distributed import resolve_device
    from diffusion_policy.serving.server import PolicyServer

    check(cfg)
    device = resolve_device(cfg.device)
    policy_dir = resolve_checkpoint(cfg.checkpoint)
    policy = load_policy(policy_dir, device=device)
    predictor = build_predictor(policy, cfg)
    if cfg.warmup:
        warm_up(policy, predictor)
    token = cfg.token or os.environ.get("DP_SERVE_TOKEN", "")
    return PolicyServer(policy, predictor, host=cfg.host, port=cfg.port, token=token or None,
                        max_message_bytes=cfg.max_message_bytes, max_clients=cfg.max_clients,
                        handshake_timeout_s=cfg.handshake_timeout_s, checkpoint=str(policy_dir))


def serve(cfg: ServeConfig) -> None:
    """Serve until Ctrl-C or SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("websockets").setLevel(logging.WARNING)
    server = make_server(cfg).bind()
    m = server.metadata
    print(f"dp-serve: serving {m['checkpoint']} ({m['task']}, {m['method']} {m['num_inference_steps']} steps, "
          f"{m['predictor']} on {m['device']}) at {server.url} (token: "
          f"{'required' if server.token else 'none'}; protocol {P.PROTOCOL_VERSION})", flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        # serve_forever has returned or been interrupted: shutdown closes the socket and every
        # connection (code 1001) and waits for the handlers
        server.close()
        print("dp-serve: stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: ``dp-serve key=value ...`` (hydra overrides on configs/serve.yaml)."""
    from diffusion_policy.config import run_cli

    return run_cli("dp-serve", "serve", serve, argv, __doc__, errors=(CheckpointError, OSError))


if __name__ == "__main__":
    sys.exit(main())
