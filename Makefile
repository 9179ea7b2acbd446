# fastmoco: `make train` and `make test` on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch 2.14.1 + torchvision 0.29.1 (timm imports torchvision; they must match).
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.fastmoco-installed
ARGS   ?=

.PHONY: setup train test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The main job on the embedded default: MoCo v2 + ResNet-18 on CIFAR-10. On a GPU the CIFAR
# recipe (200 epochs); on a CPU the short demo schedule (about 10 minutes), ending with the kNN
# accuracy against the same network at random init.
train: setup
	@if $(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; \
	then exp=cifar10_moco_v2; else exp=cpu_demo; fi; \
	echo "fastmoco train experiment=$$exp $(ARGS)"; \
	$(BIN)/fastmoco train experiment=$$exp run.dir=runs/make-train-$$exp-$$(date +%Y%m%d-%H%M%S) $(ARGS)

test: setup
	$(BIN)/python -m pytest -q -rs $(ARGS)

bench: setup
	$(BIN)/fastmoco bench $(ARGS)

clean:
	rm -rf $(VENV) runs outputs
