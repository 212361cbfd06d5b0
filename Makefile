# Every target works from a fresh clone: the ones that need Python depend on `install`.
PY := .venv/bin/python
DEMO := demo

.PHONY: install test test-images test-gpu demo bench clean

install:
	@bash scripts/install.sh

test: install
	$(PY) -m pytest -q

# Both images built with podman and the deployment run as the manifests declare it (tests/images:
# two replica pods, the classify and rollout Jobs under the NetworkPolicies, faults). Installs and
# configures podman (scripts/images.sh setup); the first build takes minutes, a rebuild reuses layers.
test-images: install
	@bash scripts/images.sh setup
	$(PY) -m pytest -q -s tests/images

# What a machine with a GPU runs: every test marked `cuda` (tests/test_cuda.py and the rest),
# none skipped for want of a device. Fails at once where CUDA is unusable.
test-gpu: install
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'make test-gpu: no usable CUDA device here')"
	$(PY) -m pytest -q -m cuda

demo: install
	@bash scripts/demo.sh

bench: install
	$(PY) scripts/benchmark.py

clean:
	rm -rf runs logs $(DEMO) model_store/*.mar .pytest_cache bench
