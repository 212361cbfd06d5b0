# Every target works from a fresh clone: the ones that need Python depend on `install`.
PY := .venv/bin/python
DEMO := demo

.PHONY: install test demo bench clean

install:
	@bash scripts/install.sh

test: install
	$(PY) -m pytest -q

demo: install
	@bash scripts/demo.sh

bench: install
	$(PY) scripts/benchmark.py

clean:
	rm -rf runs logs $(DEMO) model_store/*.mar .pytest_cache bench
