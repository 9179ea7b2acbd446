# fastmoco: `make train` and `make test` on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch 2.14.1 + torchvision 0.29.1 (timm imports torchvision; they must match).
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.fastmoco-installed
ARGS   ?=

# The tests whose figures depend on the CPU's kernels, run again as on an AVX2-only machine (no
# AVX-512, no native bf16): ATen, oneDNN and MKL capped to AVX2. On an AVX-512 machine this is
# the other kind of CPU the project runs on; on an AVX2 machine it repeats what `test` ran.
# Inductor's kernel cache does not tell the two apart: kernels built for AVX-512 and loaded under
# the AVX2 cap returned NaN, so the AVX2 run keeps its own cache.
AVX2_CAPS  := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
              TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/.venv/inductor-avx2
AVX2_TESTS := tests/test_device.py tests/test_distributed.py tests/test_model.py tests/test_train.py \
	tests/test_eval.py tests/test_knn_distributed.py

.PHONY: setup train test test-avx2 soak bench results clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The main job: MoCo v2 + ResNet-18 on CIFAR-10. On a GPU the CIFAR recipe (experiment=cifar10_moco_v2,
# 200 epochs); on a CPU the demo (experiment=cpu_demo, about 10 minutes), ending with the linear
# probe and the kNN accuracy against the same network at random init.
train: setup
	@if $(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; \
	then exp=cifar10_moco_v2; else exp=cpu_demo; fi; \
	echo "fastmoco train experiment=$$exp $(ARGS)"; \
	$(BIN)/fastmoco train experiment=$$exp run.dir=runs/make-train-$$exp-$$(date +%Y%m%d-%H%M%S) $(ARGS)

test: setup
	$(BIN)/python -m pytest -q -rs $(ARGS)

test-avx2: setup
	$(AVX2_CAPS) $(BIN)/python -m pytest -q -rs -p no:cacheprovider $(AVX2_TESTS) $(ARGS)

# The long fault-injection soak (tests/test_soak.py, a few minutes): SIGKILL/SIGTERM at random
# steps, damaged checkpoints, a switch to two processes; FASTMOCO_SOAK_SEED=<seed> repeats a draw.
soak: setup
	$(BIN)/python -m pytest -q -rs -s -p no:cacheprovider -m soak tests/test_soak.py $(ARGS)

bench: setup
	$(BIN)/fastmoco bench $(ARGS)

# docs/results.md from the benchmarks' JSON under benchmarks/results/ (a bench run writes them).
results:
	$(PYTHON) benchmarks/make_results.py

clean:
	rm -rf $(VENV) runs outputs
