# `make ioi` and `make test` set everything up on a fresh machine (virtual environments,
# pinned packages, the offline SmolLM2 model) and then run.
VENV ?= .venv
VENV_TL2 ?= .venv-tl2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: ioi test test-tl4 test-tl2

$(VENV)/.installed: requirements/tl4.txt setup.cfg
	scripts/setup-env.sh $(VENV) requirements/tl4.txt

$(VENV_TL2)/.installed: requirements/tl2.txt setup.cfg
	scripts/setup-env.sh $(VENV_TL2) requirements/tl2.txt

ioi: $(VENV)/.installed
	$(VENV)/bin/python demos/ioi_quickstart.py

test: test-tl4 test-tl2

test-tl4: $(VENV)/.installed
	scripts/run-tests.sh $(VENV)

test-tl2: $(VENV_TL2)/.installed
	scripts/run-tests.sh $(VENV_TL2)
