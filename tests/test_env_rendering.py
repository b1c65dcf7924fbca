"""envs/rendering.py: a missing GL backend is a clear error in every task that renders."""
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import envs.rendering as rendering  # noqa: E402

import pytest  # noqa: E402

from envs.avoid import AvoidEnv  # noqa: E402
from envs.pickplace import PickPlaceEnv  # noqa: E402
from envs.pusht import PushTEnv  # noqa: E402


@pytest.mark.parametrize("env_cls", [AvoidEnv, PushTEnv, PickPlaceEnv])
@pytest.mark.parametrize("gl_error", ["gladLoadGL error", "an OpenGL platform library has not been loaded"])
def test_missing_gl_backend_is_a_clear_error(monkeypatch, env_cls, gl_error):
    def no_gl(*args, **kwargs):
        raise rendering.mujoco.FatalError(gl_error)

    monkeypatch.setattr(rendering.mujoco, "Renderer", no_gl)
    env = env_cls(obs_mode="image")
    with pytest.raises(RuntimeError, match=f"{env_cls.__name__}: cannot create a MuJoCo renderer.*MUJOCO_GL=egl"):
        env.reset(seed=0)
    env.close()
