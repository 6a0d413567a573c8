# The two quick-start targets: `make demo` and `make test`. Both set up .venv first.
.PHONY: setup demo test lint
VENV := .venv/.installed

$(VENV): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

setup: $(VENV)

demo: $(VENV)
	.venv/bin/accelerate launch --config_file accelerate_configs/cpu.yaml recipes/full_finetune.py --overwrite_output_dir

test: $(VENV)
	.venv/bin/python -m pytest -q

lint: $(VENV)
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
