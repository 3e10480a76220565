# The two commands of the README: `make demo` and `make test`. Both set up what they need first.
.PHONY: setup demo test lint unit loadtest docs

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

# Regenerate what is generated from the config Structs (tests check both are current).
docs: setup
	.venv/bin/python -m gateway.config.doc > docs/config.md.tmp && mv docs/config.md.tmp docs/config.md
	.venv/bin/python -m gateway.config.schema > config/schema.json.tmp && mv config/schema.json.tmp config/schema.json

loadtest: setup
	.venv/bin/pip install -q -e '.[dev,loadtest]'
	loadtests/peer/setup_venv.sh
	.venv/bin/python -m loadtests.run
