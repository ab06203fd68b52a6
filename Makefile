.PHONY: install test
install:
	python3 -m venv .venv && .venv/bin/pip install -e '.[test]'
test:
	python -m pytest -n 2 -q
