# Two commands on a fresh machine:  `make demo` (the main job)  and  `make test`.
PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
DATA     ?= ../shared/flowers102
RUN      ?= runs/upsample

.PHONY: install demo test lint clean

$(BIN)/flowae-train: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[train,dev]'
	touch $@

install: $(BIN)/flowae-train

# Main job: train the seed's best variant on the real data with the seed's full recipe.
demo: install
	$(BIN)/flowae-train --variant upsample --data-root $(DATA) --out $(RUN)

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
