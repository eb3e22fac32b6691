# Every target bootstraps .venv itself on a fresh machine (Python 3.10-3.12 and pip are all it needs),
# and reinstalls only when pyproject.toml changes.
PYTHON ?= python3
ROOT := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
VENV := $(ROOT)/.venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
# make test / test-fast: test modules run in JOBS processes (pytest-xdist; a module stays in one, with its fixtures);
# JOBS=0 runs them all in this one.
JOBS ?= 2
# make ui, make serve: the project's store, or STORE=<tracking URI> (train.py's last line says which)
STORE ?= sqlite:///$(ROOT)/mlflow.db
# make serve: RUN=<run id> or MODEL_URI=<any MLflow model URI> from STORE, on 127.0.0.1:PORT, in WORKERS uvicorn
# worker processes (each loads the model; two keep both cores of a 2-core machine busy: docs/performance.md) of
# THREADS TensorFlow threads each (0: TensorFlow's choice, a thread per core, which two workers then fight over)
RUN ?=
MODEL_URI ?= $(if $(RUN),runs:/$(RUN)/model)
PORT ?= 5001
WORKERS ?= 2
THREADS ?= 1
# MLflow's usage reports off, in every process a target starts (`mlflow ui`, `mlflow server` and their
# workers too); an MLFLOW_DISABLE_TELEMETRY set in the environment wins.
export MLFLOW_DISABLE_TELEMETRY ?= true
# MLflow's job runner (huey queues for its GenAI jobs: prompt optimisation, trace roll-ups), which the lab never
# uses, off in `mlflow ui` and `make server`: seven fewer processes and ~25 CPU-s less at each start. An
# MLFLOW_SERVER_ENABLE_JOB_EXECUTION set in the environment wins.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION ?= false

# make server: the team tracking server, python -m experiments.store.server (its --help says more), with the variables
# given on make's command line (the environment's HOST or PORT, set by some shells and hosts, are not taken):
# DB=postgresql://user@host:port/name (default the project's sqlite), ARTIFACTS=<folder or s3://...> (mlruns/),
# HOST= (127.0.0.1), PORT= (5000, not serve's 5001), AUTH_DIR= (auth/), AUTH_DB= (AUTH_DIR/basic_auth.db),
# DEFAULT_PERMISSION= (READ), ADMIN_PASSWORD_FILE= (else the environment's MLFLOW_AUTH_ADMIN_PASSWORD; first start
# only); AUTH_CACHE_SECONDS= (60: how long a worker trusts a checked login; 0: check every request); ARGS= more
# `mlflow server` options.
server_opt = $(if $(filter command line,$(origin $(1))),--$(2) "$($(1))")
SERVER_OPTS = $(call server_opt,DB,db) $(call server_opt,ARTIFACTS,artifacts) $(call server_opt,HOST,host) \
  $(call server_opt,PORT,port) $(call server_opt,AUTH_DIR,auth-dir) $(call server_opt,AUTH_DB,auth-db) \
  $(call server_opt,DEFAULT_PERMISSION,default-permission) $(call server_opt,ADMIN_PASSWORD_FILE,admin-password-file) \
  $(call server_opt,AUTH_CACHE_SECONDS,auth-cache-seconds)

.PHONY: train test test-fast lint ui bench compare predict serve server demo notebooks notebooks-html clean

# pip shows its progress. setuptools' "Editable installation" notice (every editable_mode prints one; this
# default mode maps only experiments/ and models/ into the venv) is filtered out by its message.
$(STAMP): $(ROOT)/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install -e "$(ROOT)[dev,cluster]"
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/python $(ROOT)/train.py $(ARGS)

test: $(STAMP)
	cd $(ROOT) && $(BIN)/ruff check .
	cd $(ROOT) && $(BIN)/python -m pytest -ra --durations=15 -n $(JOBS) --dist loadfile --no-loadscope-reorder $(ARGS)

test-fast: $(STAMP)
	cd $(ROOT) && $(BIN)/python -m pytest -ra -n $(JOBS) --dist loadfile --no-loadscope-reorder -m "not slow" $(ARGS)

lint: $(STAMP)
	cd $(ROOT) && $(BIN)/ruff check .

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri $(STORE) --default-artifact-root $(ROOT)/mlruns $(ARGS)

bench: $(STAMP)
	$(BIN)/python $(ROOT)/benchmarks/bench.py $(ARGS)
	$(BIN)/python $(ROOT)/benchmarks/fixed_cost.py
	$(BIN)/python $(ROOT)/benchmarks/scratch_speed.py
	$(BIN)/python $(ROOT)/benchmarks/gradcheck_cost.py
	$(BIN)/python $(ROOT)/benchmarks/predict_bench.py
	$(BIN)/python $(ROOT)/benchmarks/demo_bench.py
	$(BIN)/python $(ROOT)/benchmarks/serve_bench.py
	$(BIN)/python $(ROOT)/benchmarks/server_auth.py

compare: $(STAMP)
	$(BIN)/python $(ROOT)/compare.py $(ARGS)

predict: $(STAMP)
	$(BIN)/python $(ROOT)/predict.py $(ARGS)

# The demo page on 127.0.0.1 (a free port, printed): draw a digit, watch two models read it.
demo: $(STAMP)
	$(BIN)/python $(ROOT)/demo.py $(ARGS)

# mlflow models serve runs `uvicorn` from PATH: the venv's bin goes first, no activation needed.
serve: $(STAMP)
	@test -n "$(MODEL_URI)" || { echo "make serve: give RUN=<run id> or MODEL_URI=<model uri>" >&2; exit 2; }
	PATH="$(BIN):$$PATH" MLFLOW_TRACKING_URI="$(STORE)" TF_NUM_INTRAOP_THREADS=$(THREADS) TF_NUM_INTEROP_THREADS=$(THREADS) \
	  $(BIN)/mlflow models serve -m "$(MODEL_URI)" --env-manager local --host 127.0.0.1 --port $(PORT) \
	  --workers $(WORKERS) $(ARGS)

server: $(STAMP)
	$(BIN)/python -m experiments.store.server $(SERVER_OPTS) $(if $(ARGS),-- $(ARGS))

# The teaching notebooks (notebooks/*.py, jupytext scripts) need JupyterLab and nbconvert, the notebooks extra; the
# venv's JupyterLab then opens .py files as notebooks (its own settings, not your home's).
NOTEBOOKS_STAMP := $(VENV)/.notebooks-installed
$(NOTEBOOKS_STAMP): $(STAMP)
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install -e "$(ROOT)[dev,cluster,notebooks]"
	$(BIN)/jupytext-config --settings-file $(VENV)/share/jupyter/lab/settings/overrides.json set-default-viewer python
	touch $@

# make notebooks: JupyterLab on 127.0.0.1 in notebooks/ (it prints its address with the login token); as root (a
# container), JupyterLab wants --allow-root.
notebooks: $(NOTEBOOKS_STAMP)
	$(BIN)/jupyter lab --ip 127.0.0.1 --no-browser --ServerApp.root_dir="$(ROOT)/notebooks" \
	  $(if $(filter 0,$(shell id -u)),--allow-root) $(ARGS)

# make notebooks-html: every notebook run top to bottom and written with its outputs to reports/notebooks/<name>.html.
notebooks-html: $(NOTEBOOKS_STAMP)
	mkdir -p $(ROOT)/reports/notebooks
	cd $(ROOT)/notebooks && for nb in [0-9]*.py; do \
	  $(BIN)/jupytext --to ipynb --output - "$$nb" | $(BIN)/jupyter nbconvert --stdin --execute --to html \
	    --output-dir $(ROOT)/reports/notebooks --output "$${nb%.py}" || exit 1; done

clean:
	cd $(ROOT) && rm -rf outputs multirun reports .pytest_cache .ruff_cache
