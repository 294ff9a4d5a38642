# kvlab: two commands do everything on a fresh machine with Python >= 3.10.
#   make course   set up .venv, execute every notebook on the built-in model -> build/course/index.html
#   make test     set up .venv, run the unit tests
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is installed first, pinned, so pip does not pull a multi-GB CUDA build on CPU machines.
# On a GPU machine: make test TORCH="torch" (or any CUDA build you prefer).
TORCH  ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export MPLBACKEND ?= Agg

.PHONY: setup test course course-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

test: setup
	$(BIN)/python -m pytest -q

course: setup
	$(BIN)/python -m kvlab.course run --quiet $(if $(ONLY),--only $(ONLY)) $(if $(MODEL),--model $(MODEL))

course-check: setup
	$(BIN)/python -m kvlab.course check

clean:
	rm -rf build .pytest_cache
