"""dp-train under torchrun with a recorder: each rank writes, after every step, the actions of the
batch it trained on and its training weights to ``$DP_PROBE_DIR/rank<r>_step<s>.safetensors``.
tests/test_train.py runs it to check that the ranks see disjoint data and hold equal weights.

    torchrun --nproc_per_node=2 tests/ddp_probe.py <dp-train overrides>
"""
import os
import sys

from safetensors.torch import save_file

import diffusion_policy.train as T
from diffusion_policy.data.batches import EpochBatches

OUT = os.environ["DP_PROBE_DIR"]
RANK = int(os.environ.get("RANK", "0"))
_last = {}
_batch, _update = EpochBatches.batch, T.ema_update


def batch(self, step):
    out = _batch(self, step)
    _last["action"] = out["action"].detach().clone()
    return out


def ema_update(ema, model, decay):
    _update(ema, model, decay)
    _last.setdefault("n", 0)
    _last["n"] += 1
    tensors = {f"param.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    path = os.path.join(OUT, f"rank{RANK}_step{_last['n']}.safetensors")
    save_file({"action": _last["action"].contiguous(), **tensors}, path)


EpochBatches.batch = batch
T.ema_update = ema_update

if __name__ == "__main__":
    sys.exit(T.main(sys.argv[1:]))
