# One command each on a fresh machine:  `make demo`  (set up + train the demo)  and  `make test`  (set up + tests).
# Both create .venv on first use. PYTHON must be 3.10+.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch. Installed on its own first so that pip never pulls the multi-GB CUDA build;
# a local wheel folder (/opt/wheels) is used where the machine has one. On a GPU machine: make TORCH=torch.
TORCH  ?= torch==2.13.0
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
STAMP  := $(BIN)/.c2r-installed

.PHONY: setup demo test test-gpu mpi lint format clean device-wheels

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(FIND_LINKS) "$(TORCH)"
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q $(FIND_LINKS) -e ".[dev]"
	touch $@

# The demo: 2 ranks under the deepspeed launcher, experts split over both (CPU processes on a CPU-only machine).
demo: setup
	BIN=$(BIN) bash launch/quickstart.sh $(ARGS)

# mpi4py for `launch/mpirun.sh`; needs OpenMPI (Debian: apt-get install openmpi-bin libopenmpi-dev).
mpi: setup
	$(BIN)/python -m pip install -q $(FIND_LINKS) "mpi4py>=3.1"

# An offline GPU host (Python 3.12) lacks Mt-KaHyPar, which the plans of the GPU run scripts need: fetch its wheel
# here into .device/wheels (which .device/setup.sh installs there), then carry .device with the call.
MTKAHYPAR ?= mtkahypar==1.7.post1
device-wheels: setup
	$(BIN)/python -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 \
		--platform manylinux_2_28_x86_64 -d .device/wheels "$(MTKAHYPAR)"

test: setup
	$(BIN)/python -m pytest $(ARGS)

test-gpu: setup
	$(BIN)/python -m pytest -m gpu $(ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check c2r placement profiling tests

format: setup
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
