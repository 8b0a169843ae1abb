# Two commands on a fresh machine:  `make demo` (the main job)  and  `make test`.
PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
DATA     ?= ../shared/flowers102
PHOTO    ?= ../shared/flowers102-fullres/jpg/image_06742.jpg
RUN      ?= runs/upsample
MODEL    ?= runs/model_upsample

.PHONY: install demo test lint clean

$(BIN)/flowae-train: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[train,dev]'
	touch $@

install: $(BIN)/flowae-train

# Main job: train the seed's best variant with the seed's full recipe on the real data,
# export it to ONNX (fp32 + int8, parity-gated) and classify a full-size photo with it.
demo: install
	$(BIN)/flowae-train --variant upsample --data-root $(DATA) --out $(RUN) $(if $(wildcard $(RUN)/checkpoint.pt),--resume)
	$(BIN)/flowae-export $(RUN) --out $(MODEL) --data-root $(DATA) --int8
	$(BIN)/flowae-infer $(PHOTO) --model $(MODEL) --reconstruct $(MODEL)/reconstructions

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
