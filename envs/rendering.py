"""Headless rendering for the MuJoCo tasks: pick a GL backend, and say how to fix a missing one.

MuJoCo chooses its OpenGL backend from ``MUJOCO_GL`` once, when ``mujoco`` is first imported, so
every env imports this module before ``mujoco``. Without a display the default (GLFW) cannot make
a context; EGL renders off-screen. A missing backend otherwise surfaces as a cryptic error from
ctypes or glad, so both the import and renderer creation turn it into one that names the fix.
"""
from __future__ import annotations

import os

FIX = (
    "Headless rendering needs MUJOCO_GL=egl with libEGL installed "
    "(apt-get install libegl1 libgl1 libegl-mesa0) or MUJOCO_GL=osmesa (libosmesa6), "
    "set before the first `import mujoco`"
)


def configure_gl() -> None:
    """Use EGL when there is no display; an explicit ``MUJOCO_GL`` always wins."""
    if "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
        os.environ["MUJOCO_GL"] = "egl"


configure_gl()

try:
    import mujoco  # noqa: E402  (after MUJOCO_GL is chosen)
except Exception as e:  # mujoco loads the MUJOCO_GL backend on import; its error types differ
    if "MUJOCO_GL" not in os.environ:
        raise  # a display and no backend named: the failure is not about GL
    raise ImportError(
        f"importing mujoco failed with MUJOCO_GL={os.environ['MUJOCO_GL']!r} "
        f"({type(e).__name__}: {e}). {FIX}; or unset MUJOCO_GL when nothing is rendered."
    ) from e


def make_renderer(model: mujoco.MjModel, height: int, width: int, *, owner: str) -> mujoco.Renderer:
    """A ``mujoco.Renderer``, or a RuntimeError naming ``owner``, ``MUJOCO_GL`` and the fix.

    The camera is chosen per frame (``renderer.update_scene(data, camera=...)``), so one renderer
    per image size serves every camera.
    """
    try:
        return mujoco.Renderer(model, height=height, width=width)
    except Exception as e:  # the GL backend's own error says little about the fix
        raise RuntimeError(
            f"{owner}: cannot create a MuJoCo renderer "
            f"(MUJOCO_GL={os.environ.get('MUJOCO_GL', '<unset>')!r}): {e}. {FIX}; "
            f"obs_mode='state' with render_mode=None needs no renderer."
        ) from e
