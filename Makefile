# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Ray and MLflow settings without which they hang or phone home in a sandbox (see README).
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

.PHONY: venv demo test bench bench-gpu lint clean reliability-doc

venv: $(STAMP)

# uv installs the pinned set (constraints.txt) in 30-60 s where pip takes 2-3 minutes (it downloads and unpacks
# in parallel); --compile-bytecode writes the .pyc files up front, as pip does (with PYTHONDONTWRITEBYTECODE set,
# every process would otherwise compile what it imports).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt uv
	$(BIN)/python -m uv pip install -q --compile-bytecode --python $(BIN)/python -c constraints.txt -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/retain-asd demo --out runs/demo

# Two pytest-xdist workers, a test module each at a time (module fixtures stay shared): the Ray tests wait on
# process starts and polls, and the other worker uses that time. TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# JSON in benchmarks/results/ (not in git). The encoder's official-code column needs BEATS_OFFICIAL_DIR
# (a folder with unilm's beats/BEATs.py, backbone.py, modules.py); without it that column is skipped.
bench: $(STAMP)
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/encoder.py
	$(BIN)/python benchmarks/knn.py
	$(BIN)/python benchmarks/stream.py
	$(BIN)/python benchmarks/train_step.py

reliability-doc: $(STAMP)
	$(BIN)/python tests/reliability_table.py

# One CUDA machine, about 5 minutes; on a machine without CUDA it says so and writes nothing.
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/gpu.py

lint: $(STAMP)
	$(BIN)/ruff check retain_asd pipelines tune tests benchmarks

clean:
	rm -rf runs benchmarks/results .pytest_cache
