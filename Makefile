# Every target sets up what it needs from nothing: a venv in .venv with qlower and its
# test extras installed in editable mode.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qlower-installed

.PHONY: install test demo examples matrix bench fuzz clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/qlower convert examples/tfc_2w2a.onnx --to qcdq -o out/tfc_2w2a.qcdq.onnx --report out/tfc_2w2a.qcdq.json
	$(VENV)/bin/qlower convert examples/mobilenet_style.onnx --to qcdq -o out/mobilenet_style.qcdq.onnx --report out/mobilenet_style.qcdq.json

# Every example in examples/; the Brevitas one needs torch and brevitas, which qlower does not:
# they are installed into the venv here (torch==2.13.0 resolves to the CPU build; Brevitas
# needs onnxoptimizer to export).
examples: $(STAMP)
	$(PY) examples/zoo_to_onnxruntime.py
	$(PY) examples/zoo_to_onnxruntime.py examples/mobilenet_style.onnx --to qcdq
	PATH="$(abspath $(VENV))/bin:$$PATH" bash examples/ci/qlower_gate.sh examples out/ci-gate qcdq
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/qlower check --to qop examples/*.onnx
	$(PY) -m pip install --quiet torch==2.13.0 brevitas onnxoptimizer
	$(PY) examples/brevitas_export_pipeline.py --to qop
	$(PY) examples/brevitas_export_pipeline.py --to qcdq

# The README's support matrix, regenerated from the pass registry and the profile policies.
matrix: $(STAMP)
	$(PY) -m qlower.support_matrix --write README.md

bench: $(STAMP)
	$(PY) tests/benchmarks/bench_convert.py
	$(PY) tests/benchmarks/bench_deployed.py
	$(PY) tests/benchmarks/bench_scale.py
	$(PY) tests/benchmarks/bench_real_exports.py

# One pytest per fuzz target, FUZZ_JOBS of them at a time (a core each: a graph is ~40 ms of
# mostly single-threaded work); fails when any target fails.
FUZZ_TARGETS := qcdq qop qcdq-ort qcdq-openvino
FUZZ_JOBS ?= 2

fuzz: $(STAMP)
	printf '%s\n' $(FUZZ_TARGETS) | QLOWER_FUZZ_EXAMPLES=$${QLOWER_FUZZ_EXAMPLES:-20000} xargs -P $(FUZZ_JOBS) -I{} \
		$(PY) -m pytest -q -m slow "tests/test_fuzz.py::test_fuzz_campaign[{}]" -p no:cacheprovider

clean:
	rm -rf out .pytest_cache .hypothesis
