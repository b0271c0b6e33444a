# mmswin: `make test` installs what is missing and runs the test suite.
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
WHEEL_CACHE ?= $(HOME)/.cache/mmswin/wheels
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmswin-installed
PYTEST_ARGS ?=

ifneq ($(words $(VENV)),1)
$(error VENV must be a path without spaces, got '$(VENV)')
endif
# The stamp holds the TORCH_SPEC it was installed with: another one installs again.
ifneq ($(shell cat $(STAMP) 2>/dev/null),$(strip $(TORCH_SPEC)))
.PHONY: $(STAMP)
endif

export VENV PYTHON TORCH_SPEC WHEEL_CACHE

.PHONY: install test clean demo

install: $(STAMP)

$(STAMP): tools/install_deps.sh setup.py $(wildcard requirements/*.txt) $(wildcard mmswin/csrc/*)
	bash tools/install_deps.sh
	printf '%s\n' "$$TORCH_SPEC" > $@

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

demo: install
	$(PY) tools/demo/run_demo.py

clean:
	rm -rf $(VENV) work_dirs build *.egg-info .pytest_cache mmswin/_C*.so
