# Two commands on a fresh machine:  `make demo` (the main job)  and  `make test`.
PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
DATA     ?= ../shared/flowers102
PHOTO    ?= ../shared/flowers102-fullres/jpg/image_06742.jpg
VARIANT  ?= res32
RUN      ?= runs/$(VARIANT)
MODEL    ?= runs/model_$(VARIANT)

.PHONY: install demo test lint clean

$(BIN)/flowae-train: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[train,dev]'
	touch $@

install: $(BIN)/flowae-train

# Main job: train the shipped variant (res32, modern recipe) on the real data, choose the
# test-time resize on val, export it to ONNX (fp32 + int8, parity-gated) and classify a
# full-size photo with it. VARIANT=upsample gives the seed's best instead.
demo: install
	$(BIN)/flowae-train --variant $(VARIANT) --data-root $(DATA) --out $(RUN) $(if $(wildcard $(RUN)/checkpoint.pt),--resume)
	$(BIN)/python -m benchmarks.resize $(RUN) --data-root $(DATA) --out $(RUN)/resize.md
	$(BIN)/flowae-export $(RUN) --out $(MODEL) --data-root $(DATA) --int8 --resize-px \
	  $$($(BIN)/python -c "import json; print(json.load(open('$(RUN)/resize.json'))['best']['resize_px'])")
	$(BIN)/flowae-infer $(PHOTO) --model $(MODEL) --reconstruct $(MODEL)/reconstructions

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
