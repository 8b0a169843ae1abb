# Two commands on a fresh machine:  `make demo` (the main job)  and  `make test`.
PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
DATA     ?= ../shared/flowers102
PHOTO    ?= ../shared/flowers102-fullres/jpg/image_06742.jpg
VARIANT  ?= res32
# The demo's short schedule of the shipped recipe; `make model` runs the full one.
DEMO_EPOCHS ?= --ae-epochs 20 --cls-epochs 120 --dec-epochs 10
RUN      ?= runs/demo_$(VARIANT)
MODEL    ?= runs/model_demo_$(VARIANT)
FULL_RUN   ?= runs/$(VARIANT)
FULL_MODEL ?= runs/model_$(VARIANT)
EXTRAS   ?= train,serve,distributed,bench,dev

.PHONY: install demo model serve test lint clean

$(BIN)/flowae-train: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $@

# onnxruntime-web for the page's in-browser mode: pinned in runtime/serve/web/package-lock.json,
# copied into runtime/serve/static/vendor/ by its postinstall step.
ORT_WEB := runtime/serve/static/vendor/ort.wasm.min.js
$(ORT_WEB): runtime/serve/web/package-lock.json
	cd runtime/serve/web && npm ci --no-audit --no-fund

install: $(BIN)/flowae-train $(ORT_WEB)

# Main job, about 10 minutes on 2 cores: train res32 on a short schedule of its recipe,
# export it (fp32 + int8, parity-gated, test-time resize chosen on val), classify a
# full-size photo and write its reconstruction beside it.
demo: install
	$(BIN)/flowae-train --variant $(VARIANT) --data-root $(DATA) --out $(RUN) $(DEMO_EPOCHS) \
	  $(if $(wildcard $(RUN)/checkpoint.pt),--resume)
	$(BIN)/flowae-export $(RUN) --out $(MODEL) --data-root $(DATA) --int8 --resize-px auto
	$(BIN)/flowae-infer $(PHOTO) --model $(MODEL) --reconstruct $(RUN)/reconstructions

# The shipped model's full recipe (about 15 min of training on a quiet 2-core machine).
model: install
	$(BIN)/flowae-train --variant $(VARIANT) --data-root $(DATA) --out $(FULL_RUN) \
	  $(if $(wildcard $(FULL_RUN)/checkpoint.pt),--resume)
	$(BIN)/flowae-export $(FULL_RUN) --out $(FULL_MODEL) --data-root $(DATA) --int8 --fp16 \
	  --resize-px auto --test-accuracy

# The HTTP API and web page for the demo's model (Ctrl-C stops it).
serve: install
	$(BIN)/flowae-serve --model $(MODEL)

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs runtime/serve/web/node_modules runtime/serve/static/vendor/ort*
