"""Configs: config.py stays below the layers, every field is documented, and validation turns the
owners' rules into one line that starts with the key."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion_policy.config import ConfigError, compose
from diffusion_policy.validation import one_line, validate

REPO = Path(__file__).resolve().parents[1]


def test_config_imports_no_layer_above_it():
    code = ("import sys, diffusion_policy.config; "
            "print(sorted(m for m in sys.modules if m.startswith('diffusion_policy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "['diffusion_policy', 'diffusion_policy.config']"


def test_every_config_field_has_a_docstring():
    tree = ast.parse((REPO / "diffusion_policy" / "config.py").read_text())
    undocumented = []
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        if not any(getattr(d, "id", None) == "dataclass" for d in cls.decorator_list):
            continue
        if ast.get_docstring(cls) is None:
            undocumented.append(cls.name)
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                nxt = body[i + 1] if i + 1 < len(body) else None
                if not (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                        and isinstance(nxt.value.value, str)):
                    undocumented.append(f"{cls.name}.{node.target.id}")
    assert undocumented == []


@pytest.mark.parametrize("job,overrides,expected", [
    ("train", ["method.scheduler=ddpn"],
     "method.scheduler='ddpn' is not allowed; expected one of ddpm, ddim, dpmsolver"),
    ("train", ["method.integrator=rk4"],
     "method.integrator='rk4' is not allowed; expected one of euler, midpoint, heun"),
    ("train", ["policy.name=cnn"], "policy.name='cnn' is not allowed; expected one of unet, transformer, mlp"),
    ("train", ["task.n_obs_steps=0"], "task.n_obs_steps=0 (To) must be >= 1"),
    ("train", ["task.n_action_steps=0"], "task.n_action_steps=0 (Ta) must be >= 1"),
    ("train", ["task.n_action_steps=16"], "task.n_action_steps=16 (Ta) must be <= horizon - n_obs_steps + 1 "
                                          "(H=16, To=2: at most 15)"),
    ("train", ["task.image_keys=[rgb]"], "task.image_keys ['rgb'] must also be listed in task.obs_keys ['state']"),
    ("train", ["method.num_inference_steps=101"], "method.num_inference_steps=101 "),
    ("train", ["ddp_comm=fp16"], "ddp_comm='fp16' is not allowed; expected one of fp32, bf16"),
    ("eval", ["checkpoint=x", "smoothing=nope"], "smoothing='nope'"),
])
def test_rules_fail_with_one_line_that_starts_with_the_key(job, overrides, expected):
    with pytest.raises(ConfigError) as e:
        validate(compose(job, overrides))
    msg = str(e.value)
    assert msg.startswith(expected) and "\n" not in msg


def test_owners_messages_keep_their_allowed_values():
    with pytest.raises(ConfigError) as e:  # the controller's list of modes comes through
        validate(compose("eval", ["checkpoint=x", "smoothing=nope"]))
    assert all(mode in str(e.value) for mode in ("none", "ensemble", "blend"))
    with pytest.raises(ConfigError, match=r"^method.num_inference_steps=101 .*at most 100"):
        validate(compose("train", ["method.num_inference_steps=101"]))
    with pytest.raises(ConfigError, match=r"^method.clip_sample=true .*dpmsolver"):
        validate(compose("train", ["method=dpmsolver", "method.clip_sample=true"]))
    with pytest.raises(ConfigError, match=r"^task.horizon=10\b.*divisible by 4"):
        validate(compose("train", ["task.horizon=10", "policy.down_dims=[8,16,32]"]))
    with pytest.raises(ConfigError, match=r"^policy.n_groups=3\b"):  # the UNet's GroupNorm, dry-run
        validate(compose("train", ["policy.n_groups=3"]))


def test_valid_configs_pass_and_come_back():
    for job, overrides in [("train", []), ("train", ["method=flow", "policy=transformer"]),
                           ("eval", ["checkpoint=x", "smoothing=blend"]),
                           ("eval", ["checkpoint=expert", "task=pusht"])]:
        cfg = compose(job, overrides)
        assert validate(cfg) is cfg


def test_one_line_qualifies_the_first_field_it_names():
    keys = {"horizon": ("task.horizon", 10), "down_dims": ("policy.down_dims", [8, 16])}
    assert one_line(ValueError("horizon H=10 must be\n  divisible by 2 (down_dims [8, 16])"), keys) == \
        "task.horizon=10: horizon H=10 must be divisible by 2 (down_dims [8, 16])"
    assert one_line(ValueError("horizon=10 is odd"), keys) == "task.horizon=10 is odd"
    assert one_line(ValueError("task.horizon=10 is odd"), keys) == "task.horizon=10 is odd"  # already named
    assert one_line(ValueError("down_dims [8, 16] before horizon"), keys) == \
        "policy.down_dims=[8, 16]: down_dims [8, 16] before horizon"
    assert one_line(ValueError("nothing known"), keys) == "nothing known"
