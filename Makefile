# `make test` and `make demo` build .venv on first use (tools/setup_env.sh), then reuse it.
PY := .venv/bin/python
DEMO_ARGS ?=

.PHONY: setup check test test-fast demo clean
setup:
	@bash tools/setup_env.sh

check: setup
	@$(PY) tools/check_env.py

test: setup
	$(PY) -m pytest -q tests

# every test but those marked slow (multi-process, end to end, or over ~3 s on CPU); `make test` runs them all
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

demo: setup
	$(PY) tools/demo.py $(DEMO_ARGS)

clean:
	rm -rf output demo_output .pytest_cache
