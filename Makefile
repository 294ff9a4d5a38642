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
# The oldest torch kvlab is tested with, pyproject's floor (so Colab keeps its own torch when it is at least
# this): `make compat-floor` installs it. The registry has no CPU build of it, so its CUDA build comes with
# the nvidia-* libraries (about 4.7 GB in the venv); it runs on the CPU all the same.
TORCH_FLOOR ?= torch==2.11.0
WHEELHOUSE ?= wheelhouse
PIP    := python -m pip install -q --disable-pip-version-check \
          $(if $(OFFLINE),--no-index --find-links $(abspath $(WHEELHOUSE)))
export HF_HUB_OFFLINE ?= 1
export MPLBACKEND ?= module://matplotlib_inline.backend_inline

.PHONY: setup test test-lowp test-gpu test-portable course course-gpu course-fp16 course-lowp course-standin course-check compat compat-floor compat-newest lock lock-floor clean lab wheelhouse

setup: $(VENV)/.installed

# A venv at $(1) with torch $(3) (default $(TORCH)) and kvlab[dev], under the constraints file $(2) (none:
# newest versions).
define make_venv
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/$(PIP) $(if $(2),-c $(2)) "$(or $(3),$(TORCH))"
	$(1)/bin/$(PIP) $(if $(2),-c $(2)) -e ".[dev]"
	$(1)/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
endef

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(call make_venv,$(VENV),$(LOCK))
	touch $@

test: setup
	$(BIN)/python -m pytest -q

# The device/dtype tier (tests/test_devices.py): every method on one device in each dtype. test-lowp: on the
# CPU in float16 and bfloat16 (CI runs it); test-gpu: on CUDA in float16, bfloat16 and float32. On a machine
# whose Python already has a CUDA torch and kvlab's requirements (a Colab runtime, a GPU box without
# network), skip the venv: make test-gpu PY=python3.
PY    ?= $(BIN)/python
SETUP  = $(if $(filter $(BIN)/python,$(PY)),setup)
test-lowp: $(SETUP)
	KVLAB_TEST_DEVICE=cpu KVLAB_TEST_DTYPES=float16,bfloat16 $(PY) -m pytest -q -m devices tests/test_devices.py
test-gpu: $(SETUP)
	KVLAB_TEST_DEVICE=cuda KVLAB_TEST_DTYPES=float16,bfloat16,float32 $(PY) -m pytest -q -m devices tests/test_devices.py

# The numerics tests (fast path = plain path, sums) again with torch's portable CPU kernels, as on CPUs whose
# vector units differ from CI's (AMD's AVX2/AVX-512 paths round differently).
NUMERICS ?= tests/test_tracing.py tests/test_neurons.py tests/test_arch.py tests/test_lens.py tests/test_vocab.py \
	tests/test_triggers.py tests/test_hooks.py tests/test_covariance.py tests/test_editing_metrics.py tests/test_standin.py \
	tests/test_kn_edit.py tests/test_exercises.py
test-portable: $(SETUP)
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest -q $(NUMERICS)

# QUICK=1: the quick profile (kvlab.course.QUICK: smaller sizes, the same code paths; claims recorded, not graded).
QUICK_FLAG = $(if $(filter-out 0,$(QUICK)),--quick)
course: setup
	$(BIN)/python -m kvlab.course run --quiet $(QUICK_FLAG) $(if $(ONLY),--only $(ONLY)) $(if $(MODEL),--model $(MODEL))

# Every notebook on CUDA in the default dtype (auto: float16, Colab's) and again in bfloat16, every failing cell
# reported (--keep-going), per-notebook time and peak GPU memory in each index.html; claims recorded, not
# graded. make course-gpu PY=python3 on a machine without a venv (see test-gpu).
course-gpu: $(SETUP)
	status=0; \
	$(PY) -m kvlab.course run --quiet --device cuda --keep-going $(QUICK_FLAG) $(if $(ONLY),--only $(ONLY)) \
	  $(if $(MODEL),--model $(MODEL)) --out build/course-gpu || status=1; \
	$(PY) -m kvlab.course run --quiet --device cuda --keep-going $(QUICK_FLAG) $(if $(ONLY),--only $(ONLY)) \
	  $(if $(MODEL),--model $(MODEL)) -p DTYPE bfloat16 --out build/course-gpu-bfloat16 || status=1; \
	exit $$status

# Every notebook on the CPU in float16 with the quick profile (CI runs it), so a float16 bug fails CI without
# a GPU; every failing cell reported.
course-fp16: setup
	$(BIN)/python -m kvlab.course run --quiet --device cpu --keep-going --quick -p DTYPE float16 \
	  $(if $(ONLY),--only $(ONLY)) --out build/course-float16

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
	$(call make_venv,.venv-$*,$(if $(filter floor,$*),$(FLOOR)),$(if $(filter floor,$*),$(TORCH_FLOOR)))
	.venv-$*/bin/python -c "import torch, transformers, tokenizers, peft, numpy; \
	  print('$*:', 'torch', torch.__version__, 'transformers', transformers.__version__, \
	  'tokenizers', tokenizers.__version__, 'peft', peft.__version__, 'numpy', numpy.__version__)"
	.venv-$*/bin/python -m pytest -q -p no:cacheprovider
	.venv-$*/bin/python -m kvlab.course run --quiet --no-html --only 00 05 --out build/compat-$*

# Regenerate both locks with uv (installed into build/uv). The lock: the newest versions that resolve,
# for CPython 3.11 on Linux x86-64 (used as constraints, so other platforms add what they need), against
# the CPU build of $(LOCK_TORCH). The floor: the lowest version of every direct dependency (uv's
# lowest-direct), against $(TORCH_FLOOR), whose CUDA libraries stay out of the lock (pip installs the ones
# that torch build pins). LOCK_SOURCES says where the CPU build is (elsewhere: LOCK_SOURCES="--extra-index-url
# https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match"). `make lock-floor` redoes the
# floor alone.
LOCK_TORCH   ?= torch==2.13.0+cpu
LOCK_SOURCES ?= --find-links /opt/wheels
CUDA_PACKAGES = cuda-bindings cuda-pathfinder cuda-toolkit nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc \
	nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse \
	nvidia-cusparselt-cu13 nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx
LOCK_ARGS = pyproject.toml --extra dev --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	$(LOCK_SOURCES) --no-emit-package torch $(addprefix --no-emit-package ,$(CUDA_PACKAGES)) --quiet \
	--upgrade --custom-compile-command "make lock"
build/uv/bin/uv:
	$(PYTHON) -m venv build/uv && build/uv/bin/$(PIP) uv
lock: build/uv/bin/uv lock-floor
	echo "$(LOCK_TORCH)" > build/lock-torch.txt
	build/uv/bin/uv pip compile $(LOCK_ARGS) --override build/lock-torch.txt -o $(LOCK)
lock-floor: build/uv/bin/uv
	echo "$(TORCH_FLOOR)" > build/lock-torch-floor.txt
	build/uv/bin/uv pip compile $(LOCK_ARGS) --override build/lock-torch-floor.txt --resolution lowest-direct -o $(FLOOR)

clean:
	rm -rf build .pytest_cache
