"""Shared test set-up: headless MuJoCo rendering and a marker for tests that need it; under
``CI=true`` no test may skip except the GPU-only ones listed in :data:`GPU_ONLY` (a missing
dependency that the README installs, EGL or MetaWorld, fails the run there instead of passing it)."""
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


# Tests that need a CUDA device and skip without one: the only skips allowed under CI=true. Each
# names the CPU tests that cover the same code (the fused kernels run in Triton's interpreter).
GPU_ONLY = {
    "tests/test_fused_unet.py::test_fast_predictor_fused_equals_predict":
        "test_fused_unet.py::test_fused_path_equals_forward and "
        "test_fused_path_runs_the_sampler_step_and_a_prefix (the same kernels, interpreted on CPU)",
    "tests/test_fused_unet.py::test_fused_equals_the_reference_loop_for_every_sampler":
        "test_fused_unet.py::test_fused_path_runs_the_sampler_step_and_a_prefix (sampler step rows) "
        "and test_step_update.py (the step formula against each sampler's plain loop)",
    "tests/test_fused_unet.py::test_fused_bf16_matches_the_bf16_tokens_path":
        "none on CPU for the bf16 numerics; test_fused_unet.py::test_every_kernel_compiles_for_hopper "
        "compiles the bf16 kernels for sm_90",
}


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.split("[")[0] in GPU_ONLY:
            item.add_marker(pytest.mark.gpu)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skip is a failure unless the test is GPU-only (GPU_ONLY): a broken install
    (no EGL, no MetaWorld, no Triton) must not pass CI as skipped tests."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and _in_ci() and item.nodeid.split("[")[0] not in GPU_ONLY and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"CI=true: {item.nodeid} skipped ({reason}); a dependency the README installs is missing"
