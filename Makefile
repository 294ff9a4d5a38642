# kvlab: two commands do everything on a fresh machine with Python >= 3.11.
#   make course   set up .venv, execute every notebook on the built-in model -> build/course/index.html
#   make test     set up .venv, run the unit tests
# Both install exactly the versions CI tested: requirements.lock (see `make lock`).
#   make compat         the unit tests and notebooks 00 and 05 at the floor versions of pyproject.toml
#                       (requirements-floor.lock) and at the newest versions the registry has
#   make compat-floor   the floor half alone (CI runs it)
#   make lab            set up .venv, then JupyterLab on notebooks/ with the project's kernel and widgets
#   make wheelhouse     download every wheel of the lock (and $(TORCH)) into wheelhouse/: the offline kit;
#                       then `make lab OFFLINE=1` (or setup, test, course) installs from it with no network
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
LOCK   ?= requirements.lock
FLOOR  ?= requirements-floor.lock
# torch is installed first, pinned, so pip does not pull a multi-GB CUDA build on CPU machines.
# On a GPU machine: make test TORCH="torch" (or any CUDA build you prefer). The locks pin torch's
# dependencies, never torch itself.
TORCH  ?= torch==2.13.0
WHEELHOUSE ?= wheelhouse
PIP    := python -m pip install -q --disable-pip-version-check \
          $(if $(OFFLINE),--no-index --find-links $(abspath $(WHEELHOUSE)))
export HF_HUB_OFFLINE ?= 1
export MPLBACKEND ?= module://matplotlib_inline.backend_inline

.PHONY: setup test course course-lowp course-standin course-check compat compat-floor compat-newest lock clean lab wheelhouse

setup: $(VENV)/.installed

# A venv at $(1) with $(TORCH) and kvlab[dev], under the constraints file $(2) (none: newest versions).
define make_venv
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/$(PIP) $(if $(2),-c $(2)) "$(TORCH)"
	$(1)/bin/$(PIP) $(if $(2),-c $(2)) -e ".[dev]"
	$(1)/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
endef

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(call make_venv,$(VENV),$(LOCK))
	touch $@

test: setup
	$(BIN)/python -m pytest -q

course: setup
	$(BIN)/python -m kvlab.course run --quiet $(if $(ONLY),--only $(ONLY)) $(if $(MODEL),--model $(MODEL))

# JupyterLab on notebooks/, the venv's kernel ("python3" inside .venv). MPLBACKEND is dropped so figures draw
# inline. Extra options: make lab LAB_ARGS="--no-browser --port 8890".
lab: setup
	env -u MPLBACKEND $(BIN)/python -m jupyterlab --ServerApp.root_dir=notebooks $(LAB_ARGS)

# The offline kit: every wheel of $(LOCK), $(TORCH) with its dependencies (pinned by the lock) and the build
# backend of the editable install, for this machine's platform and Python. Copy the repository with
# wheelhouse/ to each laptop (USB stick), then `make lab OFFLINE=1`.
wheelhouse:
	mkdir -p $(WHEELHOUSE)
	$(PYTHON) -m pip download -q --disable-pip-version-check --only-binary :all: --no-deps -r $(LOCK) -d $(WHEELHOUSE)
	$(PYTHON) -m pip download -q --disable-pip-version-check --only-binary :all: -c $(LOCK) "$(TORCH)" \
	  "setuptools>=68" -d $(WHEELHOUSE)
	@echo "$(WHEELHOUSE): $$(ls $(WHEELHOUSE) | wc -l) files, $$(du -sh $(WHEELHOUSE) | cut -f1)"

# The identities of notebooks 01, 03 and 05 in low precision, as on a GPU (CPU bfloat16): tolerances come
# from the dtype, float32 where the package needs it.
LOWP ?= bfloat16
course-lowp: setup
	$(BIN)/python -m kvlab.course run --quiet --only 01 03 05 -p DTYPE $(LOWP) --out build/course-$(LOWP)

# Notebooks 05, 06, 07 and 09 on a stand-in for a real model (kvlab.standin: a tiny GPT-2 with a byte-level
# BPE tokenizer, or STANDIN=llama: a tiny Llama with a sentencepiece-style one, trained on real facts in
# ROME's formats and cached), with KNOWN / COUNTERFACT set to those real-format files (absolute paths:
# notebooks run in notebooks/), CORPUS to the stand-in's training texts; small sizes.
STANDIN ?= gpt2
STANDIN_SIZES ?= -p N_FACTS 12 -p SAMPLES 3 -p N_SWEEP 4 -p N_TRACE 4 -p N_EDITS 8 -p SWEEP_EDITS 2 \
	-p COV_SAMPLES 300 -p COUNTS "[2, 4]"
course-standin: setup
	mkdir -p build && $(BIN)/python -m kvlab.standin build $(STANDIN) --quiet > build/standin-$(STANDIN).path
	$(BIN)/python -m kvlab.course run --quiet --only 05 06 07 09 --model "$$(cat build/standin-$(STANDIN).path)" \
	  -p KNOWN $(CURDIR)/data/standin/known_1000.json -p COUNTERFACT $(CURDIR)/data/standin/counterfact.json \
	  -p CORPUS "$$(cat build/standin-$(STANDIN).path)/corpus.txt" $(STANDIN_SIZES) \
	  --out build/course-standin$(if $(filter-out gpt2,$(STANDIN)),-$(STANDIN))

course-check: setup
	$(BIN)/python -m kvlab.course check

# The unit tests and notebooks 00 and 05 in a second venv: floor = the lowest versions pyproject.toml
# allows (requirements-floor.lock); newest = whatever the registry serves today (no lock).
compat: compat-floor compat-newest

compat-floor compat-newest: compat-%:
	$(call make_venv,.venv-$*,$(if $(filter floor,$*),$(FLOOR)))
	.venv-$*/bin/python -c "import torch, transformers, tokenizers, peft, numpy; \
	  print('$*:', 'torch', torch.__version__, 'transformers', transformers.__version__, \
	  'tokenizers', tokenizers.__version__, 'peft', peft.__version__, 'numpy', numpy.__version__)"
	.venv-$*/bin/python -m pytest -q -p no:cacheprovider
	.venv-$*/bin/python -m kvlab.course run --quiet --no-html --only 00 05 --out build/compat-$*

# Regenerate both locks with uv (installed into build/uv). The lock: the newest versions that resolve,
# for CPython 3.11 on Linux x86-64 (used as constraints, so other platforms add what they need).
# The floor: the lowest version of every direct dependency (uv's lowest-direct). Both are resolved
# against the CPU build of torch, so that no CUDA packages enter them; LOCK_SOURCES says where that
# build is (elsewhere: LOCK_SOURCES="--extra-index-url https://download.pytorch.org/whl/cpu
# --index-strategy unsafe-best-match").
LOCK_TORCH   ?= torch==2.13.0+cpu
LOCK_SOURCES ?= --find-links /opt/wheels
LOCK_ARGS = pyproject.toml --extra dev --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	$(LOCK_SOURCES) --override build/lock-torch.txt --no-emit-package torch --quiet
lock:
	test -x build/uv/bin/uv || ($(PYTHON) -m venv build/uv && build/uv/bin/$(PIP) uv)
	echo "$(LOCK_TORCH)" > build/lock-torch.txt
	build/uv/bin/uv pip compile $(LOCK_ARGS) --upgrade --custom-compile-command "make lock" -o $(LOCK)
	build/uv/bin/uv pip compile $(LOCK_ARGS) --resolution lowest-direct --upgrade \
	  --custom-compile-command "make lock" -o $(FLOOR)

clean:
	rm -rf build .pytest_cache
