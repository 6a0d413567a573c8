# The two quick-start targets: `make demo` and `make test`. Both set up .venv first.
.PHONY: setup demo test lint
VENV := .venv/.installed

$(VENV): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

setup: $(VENV)

demo: $(VENV)
	.venv/bin/accelerate launch --config_file accelerate_configs/cpu.yaml recipes/full_finetune.py --overwrite_output_dir
	.venv/bin/finetune-recipes predict --model outputs/full_finetune \
		"Shares in the bank rose after profits beat forecasts" \
		"The striker scored twice as the champions won the cup final" \
		"MPs voted on the government's new education bill"

# Everything, slow tests included (2-process runs, kill-and-resume): a few minutes on 2 cores.
test: $(VENV)
	.venv/bin/python -m pytest -q -m "slow or not slow"

lint: $(VENV)
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
