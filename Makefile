# The two commands of the README. Everything else is set up by them.
.PHONY: serve test lint

serve:
	scripts/bootstrap.sh
	.venv/bin/nomoat serve $(ARGS)

test:
	scripts/bootstrap.sh test,dev
	$(MAKE) lint
	.venv/bin/python -m pytest $(PYTEST_ARGS)

lint:
	.venv/bin/ruff check gateway tests loadtests
	.venv/bin/ruff format --check gateway
	.venv/bin/mypy gateway
