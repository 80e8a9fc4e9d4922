# make demo: install and run the main job on the bundled samples
# make test: install and run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the pinned CPU wheel first: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: install
	$(PY) samples/build.py
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash samples/demo.sh

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/run.py --sizes 0.5,2

clean:
	rm -rf $(VENV) samples/out bench-out
