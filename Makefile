# The two commands of the README: `make demo` and `make test`. Both set up what they need first.
.PHONY: setup demo test lint unit loadtest

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/python scripts/demo.py

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

test: lint
	.venv/bin/python -m pytest

unit: setup
	.venv/bin/python -m pytest tests/unit

loadtest: setup
	.venv/bin/pip install -q -e '.[dev,loadtest]'
	loadtests/peer/setup_venv.sh
	.venv/bin/python -m loadtests.run
