"""Shared test set-up: headless MuJoCo rendering and a marker for tests that need it."""
import os
import warnings

os.environ.setdefault("MUJOCO_GL", "egl")
# Without a GPU, Triton kernels (the fused sampling path) run in Triton's interpreter. It must be
# chosen before triton is first imported: triton.language's own helpers are decorated then.
if not os.path.exists("/dev/nvidiactl") and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


def gl_available() -> bool:
    """Whether MuJoCo can open an offscreen GL context here (EGL on a headless machine)."""
    try:
        import mujoco

        mujoco.Renderer(mujoco.MjModel.from_xml_string("<mujoco/>"), 8, 8).close()
        return True
    except Exception:
        return False


needs_gl = pytest.mark.skipif(
    not gl_available(), reason="no OpenGL backend for MuJoCo (set MUJOCO_GL=egl; install libegl1 libgl1 libegl-mesa0)")


@pytest.fixture(autouse=True)
def one_thread():
    """The suite's networks are tiny: one intra-op thread is faster, and it avoids OpenMP threads
    spin-waiting on each other when the two cores are shared (benchmarks/eval_rollouts.md)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def check_env_without_warnings(env) -> None:
    """Gymnasium's env checker passes on ``env`` and warns about nothing."""
    from gymnasium.utils.env_checker import check_env

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    assert [str(w.message) for w in caught] == []
