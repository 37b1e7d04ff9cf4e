# Two commands do all the set-up: `make demo` and `make test`. Each creates .venv once
# (idempotent), with torch pinned to 2.13.0 by constraints.txt. PyTorch's CPU index is
# offered beside PyPI for torch alone: on Linux, PyPI's torch wheel is the CUDA build,
# and the "+cpu" local version wins over it for the same release. torch's own
# requirements come from PyPI in the next step, under the same constraints, with the
# examples extra (matplotlib, for the demo's and the sweep's plots). setuptools notes
# "Editable installation." on every editable install of this layout (a reminder that a
# folder named like the package may shadow it, not a problem here): PYTHONWARNINGS hides
# that note alone, so the install prints nothing when all is well.
PYTHON ?= python3
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.holotx-installed

.PHONY: demo test lint bench venv clean torch-suite

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-deps --extra-index-url $(TORCH_INDEX) torch==2.13.0
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet -c constraints.txt -e '.[test,examples,frameworks,docs]'
	$(PY) -m pip install --quiet --no-deps pylocron==0.3.0
	$(PY) -m pip install --quiet --no-deps pytorch-optimizer==4.1.0
	touch $(STAMP)

# Flags for the script go in ARGS: `make demo ARGS="--quick"` (make would take
# `make demo --quick` as an option of its own, and refuse it).
ARGS ?=

demo: $(STAMP)
	$(PY) examples/demo.py $(ARGS)

# Two test processes (pytest-xdist): the suite is mostly single-threaded Python and
# compiles, so two cores take it from about 12 to about 8.5 minutes. `pytest -p no:xdist`
# runs it in one process and prints the parity reports (workers' reports are not shown).
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2

# Opt-in: PyTorch's own optimizer tests (TestOptimRenewed) run on holotx's classes. Needs
# torch's test/test_optim.py from a pytorch checkout at the installed tag (v2.13.0), which
# the wheel does not ship: make torch-suite TORCH_TEST_OPTIM=/path/to/pytorch/test/test_optim.py
torch-suite: $(STAMP)
	@test -n "$(TORCH_TEST_OPTIM)" || { echo "set TORCH_TEST_OPTIM=/path/to/pytorch/test/test_optim.py"; exit 2; }
	$(PY) .ci/torch_optim_suite.py $(TORCH_TEST_OPTIM)

bench: $(STAMP)
	$(PY) examples/benchmark.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
