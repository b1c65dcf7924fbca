# Two commands do all of the set-up on a fresh Debian machine with Python 3.11:
#   make demo   collect demonstrations, train, evaluate, write rollouts/ (default task, CPU)
#   make test   lint (ruff, configured in pyproject.toml), then run the test suite
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
export MUJOCO_GL ?= egl

.PHONY: setup sysdeps demo test bench clean

sysdeps:
	@ldconfig -p | grep -q libEGL.so.1 && ldconfig -p | grep -q 'libGL.so.1' && ls /usr/lib/*/libEGL_mesa.so.0 >/dev/null 2>&1 || \
	  { echo "installing headless GL (libegl1 libgl1 libegl-mesa0)"; \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq libegl1 libgl1 libegl-mesa0 >/dev/null; }

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the CPU build, so that no multi-GB CUDA build is pulled in by the package's requirement
	$(BIN)/pip install -q torch==2.13.0
	# Triton for the fused sampling path's tests: its CPU interpreter runs the kernels, its compiler
	# builds them for sm_90 without a GPU (3.6.0: the version beside the GPU machines' torch 2.11)
	$(BIN)/pip install -q triton==3.6.0
	$(BIN)/pip install -q -e '.[dev,metaworld]'
	# MetaWorld beside our tasks (its tests run too); --no-deps keeps our mujoco 3.3.7
	$(BIN)/pip install -q --no-deps metaworld==3.1.1
	touch $@

setup: sysdeps $(VENV)/.installed

demo: setup
	$(BIN)/dp-demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) *.egg-info
