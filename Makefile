# The two commands of the README. Everything else is set up by them.
.PHONY: serve test lint

PLUGINS := $(wildcard plugins/*/)

serve:
	scripts/bootstrap.sh
	.venv/bin/nomoat serve $(ARGS)

test:
	scripts/bootstrap.sh test,dev
	$(MAKE) lint
	NOMOAT_HYPOTHESIS_PROFILE=ci .venv/bin/python -m pytest $(PYTEST_ARGS)

lint:
	@# ruff also keeps the core from importing plugins/ (TID251 in pyproject.toml).
	.venv/bin/ruff check gateway tests loadtests plugins
	.venv/bin/ruff format --check gateway plugins
	.venv/bin/mypy gateway
	@# mypy cannot follow setuptools' editable finders: point it at each plugin.
	@for dir in $(PLUGINS); do \
	  pkg=$$(basename $$dir | tr - _); \
	  MYPYPATH=$$dir .venv/bin/mypy --strict $$dir$$pkg || exit 1; \
	done
