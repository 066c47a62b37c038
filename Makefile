# The README's commands. `make test` sets up everything on a fresh machine (virtual environment,
# pinned requirements, libgtest-dev), builds the extension and runs ctest then pytest; a second
# run reuses the environment and rebuilds only what changed.
#
#   make test       CPU build + C++ and Python tests (what CI runs)
#   make test-sanitize  the C++ tests under sanitizers (CI runs it after `make test`)
#   make train      the same setup, then a progressive training run (configs/shakespeare-tiny.yaml)
#   make gpu-check  offline GPU machine, under 10 minutes: CUDA build, CUDA tests only, GPU
#                   benchmarks, 50 steps of every config, memory in depth; one JSON report
#   make gpu-test   offline GPU machine: system Python, no installs, every test and GPU benchmarks
#   make bench      CPU benchmarks (bench/*.py), tables on stdout, JSON in bench/results/
#   make lint       ruff
#   make clean      remove build outputs (keeps .venv)

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
BUILD_DIR ?= build/venv
GPU_BUILD_DIR ?= build/gpu
MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
export MAX_JOBS

.PHONY: test test-sanitize train build venv sysdeps gpu-check gpu-test bench lint clean info

test: build
	@echo "== build info"
	$(VPY) -m stackwise.info
	@echo "== C++ tests (ctest)"
	@if [ -f $(BUILD_DIR)/tests/cpp/CTestTestfile.cmake ]; then \
	  $(VPY) -c "import cmake, os, sys; os.execv(os.path.join(cmake.CMAKE_BIN_DIR, 'ctest'), ['ctest'] + sys.argv[1:])" \
	    --test-dir $(BUILD_DIR) --output-on-failure --timeout 300; \
	else echo "C++ tests not built (GTest missing)"; exit 1; fi
	@echo "== Python tests (pytest)"
	$(VPY) -m pytest tests/python

# ThreadSanitizer over the torch-free core (test_core: the activation-cache store's concurrent
# tests among them), then AddressSanitizer + UBSan over the op kernels that have C++ tests
# (test_ops, DEFAULT ISA only) and test_core again, each in a build folder of its own; a finding
# fails the run. test_core's sources are listed once, in cmake/StackwiseCoreTests.cmake.
VCMAKE := $(VPY) -c "import cmake, os, sys; p = os.path.join(cmake.CMAKE_BIN_DIR, 'cmake'); os.execv(p, [p] + sys.argv[1:])"
VCTEST := $(VPY) -c "import cmake, os, sys; os.execv(os.path.join(cmake.CMAKE_BIN_DIR, 'ctest'), ['ctest'] + sys.argv[1:])"
SAN_CONFIG := -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) -DPython3_EXECUTABLE=$(abspath $(VPY))
test-sanitize: venv sysdeps
	@echo "== ThreadSanitizer: the core and the cache store's concurrent tests"
	$(VCMAKE) -S . -B build/tsan $(SAN_CONFIG) -DSTACKWISE_SANITIZE=thread >/dev/null
	$(VCMAKE) --build build/tsan
	TSAN_OPTIONS=halt_on_error=1 $(VCTEST) --test-dir build/tsan --output-on-failure --timeout 300
	@echo "== AddressSanitizer + UBSan: the op kernels with C++ tests"
	$(VCMAKE) -S . -B build/san-ops $(SAN_CONFIG) -DSTACKWISE_SANITIZE=ops >/dev/null
	$(VCMAKE) --build build/san-ops
	UBSAN_OPTIONS=print_stacktrace=1 \
	  $(VCTEST) --test-dir build/san-ops --output-on-failure --timeout 300

# A progressive run on the Shakespeare corpus into runs/shakespeare-tiny (about 10 minutes on 2
# CPU cores). TRAIN_ARGS passes more options, e.g. TRAIN_ARGS=--overwrite or --resume.
TRAIN_CONFIG ?= configs/shakespeare-tiny.yaml
TRAIN_ARGS ?=
train: build
	$(VPY) -m stackwise train --config $(TRAIN_CONFIG) $(TRAIN_ARGS)

venv: $(VENV)/.requirements.stamp

$(VENV)/.requirements.stamp: requirements.txt requirements-nodeps.txt
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -r requirements.txt
	$(VPY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	@touch $@

# libgtest-dev from Debian when it is missing (needs root or sudo).
sysdeps:
	@if [ ! -f /usr/include/gtest/gtest.h ]; then \
	  echo "installing libgtest-dev"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q libgtest-dev >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q libgtest-dev >/dev/null; }; \
	fi

build: venv sysdeps
	STACKWISE_BUILD_DIR=$(BUILD_DIR) $(VPY) -m pip install --quiet --no-build-isolation --no-deps -e .

info: build
	$(VPY) -m stackwise.info

# The GPU check (bench/gpu_check.py): build with every core, the C++ tests, the CUDA tests only
# (pytest -k cuda), bench/gpu_report.py, 50 steps of every configs/*.yaml on the GPU, and
# bench/gpu_memory.py (progressive vs end-to-end peak memory at 2-16 blocks against the
# planner). Writes bench/results/gpu/check.json and prints a one-screen summary.
gpu-check:
	$(PYTHON) bench/gpu_check.py --json bench/results/gpu/check.json

# The GPU machine has no network: torch, cmake, ninja, pybind11 and pytest are preinstalled for
# its system Python. CUDA must build there (STACKWISE_BUILD_CUDA=1); every test runs, the CUDA
# ones included, then the GPU benchmarks write their JSON to bench/results/gpu/ (report.json:
# attention vs SDPA-flash, RMSNorm/RoPE/SwiGLU vs the measured copy bandwidth, the ceilings).
gpu-test:
	PIP_BREAK_SYSTEM_PACKAGES=1 STACKWISE_BUILD_DIR=$(GPU_BUILD_DIR) STACKWISE_BUILD_CUDA=1 \
	  $(PYTHON) -m pip install --no-build-isolation --no-deps --no-index -e .
	$(PYTHON) -m stackwise.info
	@if [ -f $(GPU_BUILD_DIR)/tests/cpp/CTestTestfile.cmake ]; then \
	  $(PYTHON) -c "import cmake, os, sys; os.execv(os.path.join(cmake.CMAKE_BIN_DIR, 'ctest'), ['ctest'] + sys.argv[1:])" \
	    --test-dir $(GPU_BUILD_DIR) --output-on-failure --timeout 300 || exit 1; \
	else echo "C++ tests not built (GTest missing)"; fi
	$(PYTHON) -m pytest tests/python -rs
	$(PYTHON) bench/ops_swiglu.py --device cuda --json bench/results/gpu/ops_swiglu.json
	$(PYTHON) bench/ops_quant.py --device cuda --json bench/results/gpu/ops_quant.json
	$(PYTHON) bench/gpu_report.py --json bench/results/gpu/report.json

bench: build
	$(VPY) bench/ops_swiglu.py --device cpu
	$(VPY) bench/ops_norm_rope.py
	$(VPY) bench/ops_attention.py
	$(VPY) bench/ops_linear_attention.py --device cpu
	$(VPY) bench/ops_quant.py
	$(VPY) bench/ops_linear_cross_entropy.py --tokens 2048
	$(VPY) bench/cache_store.py
	$(VPY) bench/e2e_depth.py

lint: venv
	$(VENV)/bin/ruff check python tests bench setup.py
	$(VENV)/bin/ruff format --check python tests bench setup.py

clean:
	rm -rf build python/stackwise/_C*.so python/stackwise/*.egg-info
