# `make ioi` and `make test` set everything up on a fresh machine (virtual environments,
# pinned packages, the offline SmolLM2 model) and then run.
VENV ?= .venv
VENV_TL2 ?= .venv-tl2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: ioi test test-tl4 test-tl2 docs browser

$(VENV)/.installed: requirements/tl4.txt requirements/docs.txt setup.cfg
	scripts/setup-env.sh $(VENV) requirements/tl4.txt requirements/docs.txt

$(VENV_TL2)/.installed: requirements/tl2.txt setup.cfg
	scripts/setup-env.sh $(VENV_TL2) requirements/tl2.txt

ioi: $(VENV)/.installed
	$(VENV)/bin/tl-patch ioi --out ioi-report

test: docs browser test-tl4 test-tl2

# Debian's chromium, for the test that opens the IOI report in a real browser.
browser:
	scripts/install-browser.sh

test-tl4: $(VENV)/.installed
	scripts/run-tests.sh $(VENV)

test-tl2: $(VENV_TL2)/.installed
	scripts/run-tests.sh $(VENV_TL2)

# The documentation site, in site/; fails on any warning (a broken link, a bad docstring).
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict
