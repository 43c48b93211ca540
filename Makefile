# The two commands a newcomer needs: `make demo` and `make test`. Both run `make setup` first.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test-tools demo test unit integration bench chaos soak lint format clean

setup:
	@bash scripts/setup.sh

# Tools the unit tests run but the image must not contain (shellcheck, ruby; a pinned kubectl in
# .venv/test-tools): a list of their own.
test-tools: setup
	@bash scripts/setup.sh --test-tools

demo: setup
	@bash scripts/demo.sh

# Lint and type checks, unit tests (no privileges), then integration tests (root, netns, real
# CNI plugins). pytest exits non-zero when a stage fails or collects nothing. Unit tests run on
# every core (pytest-xdist); integration tests one at a time (they time real traffic). The
# integration stage prints its 20 slowest steps: the whole target must stay under 25 minutes.
test: setup test-tools lint
	$(BIN)/pytest -q -n auto tests/unit
	$(BIN)/pytest -q -m integration --durations=20 tests/integration

unit: setup test-tools
	$(BIN)/pytest -q -n auto tests/unit

integration: setup
	$(BIN)/pytest -q -m integration tests/integration

# Benchmarks (not part of `make test`; its integration tests run a smoke variant of each):
# per-node Envoy against no mesh and against sidecars. Figures and plots go to bench/results/.
bench: setup
	$(BIN)/python -m bench

# Faults under load (not part of `make test`, which runs its smoke variant, test_chaos.py): the
# agent and the node Envoy killed under steady traffic; figures and the table in chaos/README.md.
chaos: setup
	$(BIN)/python -m chaos

# 30 minutes of load with certificate rotation, config and pod churn and a fault a minute: memory
# and file descriptors of each node's agent and Envoy over time (chaos/results/soak.json, .png).
soak: setup
	$(BIN)/python -m chaos.soak

lint: setup
	$(BIN)/ruff check nodeagent tests bench chaos
	$(BIN)/ruff format --check nodeagent tests bench chaos
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format nodeagent tests bench chaos
	$(BIN)/ruff check --fix nodeagent tests bench chaos

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
