# CityPark — the two commands: `make run` (whole city, embedded) and `make test` (real infra).
SHELL := /bin/bash
.DEFAULT_GOAL := help
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export CITYPARK_PG_PORT ?= 5432
export CITYPARK_REDIS_PORT ?= 6379
export CITYPARK_KAFKA_PORT ?= 9092

# The real topology on loopback (what `make up` and the integration tests use).
REAL_ENV := CITYPARK_DATABASE_URL=postgresql+psycopg://citypark:citypark@127.0.0.1:$(CITYPARK_PG_PORT)/citypark \
	CITYPARK_REDIS_URL=redis://127.0.0.1:$(CITYPARK_REDIS_PORT)/0 \
	CITYPARK_KAFKA_BOOTSTRAP=127.0.0.1:$(CITYPARK_KAFKA_PORT) \
	CITYPARK_BUS=kafka CITYPARK_CACHE=redis

.PHONY: help venv bench-deps run up infra-up infra-down infra-status test test-unit lint format bench load clean chaos

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml sdk/pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' -e ./sdk
	@touch $(STAMP)

venv: $(STAMP) ## create the virtualenv and install the project

.env:
	@umask 077; echo "CITYPARK_JWT_SECRET=$$($(PY) -c 'import secrets; print(secrets.token_hex(32))')" > .env
	@echo "wrote .env with a fresh CITYPARK_JWT_SECRET"

run: venv .env ## the whole city in one process on the embedded default, http://127.0.0.1:8000
	@mkdir -p .local
	CITYPARK_SANDBOX_MODE=true $(BIN)/citypark run all --demo

infra-up: venv ## start PostgreSQL, Redis and Kafka on loopback (idempotent)
	bash deploy/local/infra.sh up

infra-down: ## stop them
	bash deploy/local/infra.sh down

infra-status:
	bash deploy/local/infra.sh status

up: venv .env infra-up ## the real topology: every part its own process (Ctrl-C stops all)
	set -a; source deploy/local/real.env; set +a; $(BIN)/citypark migrate
	$(BIN)/honcho -f deploy/local/Procfile -e .env,deploy/local/real.env start

test: venv ## install, start the infrastructure, run the whole suite and a quick chaos run, stop it
	@status=0; \
	bash deploy/local/infra.sh up || exit 1; \
	$(REAL_ENV) $(BIN)/pytest $(PYTEST_ARGS) || status=$$?; \
	if [ $$status -eq 0 ] && [ -z "$(SKIP_CHAOS)" ]; then \
	  $(MAKE) --no-print-directory chaos QUICK=1 CHAOS_PG_PORT=$(CITYPARK_PG_PORT) \
	    CHAOS_REDIS_PORT=$(CITYPARK_REDIS_PORT) CHAOS_KAFKA_PORT=$(CITYPARK_KAFKA_PORT) \
	    CHAOS_INFRA_DIR=.local || status=$$?; \
	fi; \
	bash deploy/local/infra.sh down; \
	exit $$status

test-unit: venv ## pure-logic tests only (no infrastructure)
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

bench-deps: venv
	@$(BIN)/python -c "import locust, matplotlib" 2>/dev/null || $(BIN)/pip install -q -e '.[bench]'

bench: bench-deps ## benchmark on the real topology (QUICK=1: under 3 minutes); reports/ holds the results
	bash deploy/local/infra.sh up
	$(BIN)/python -m loadtests.bench $(if $(QUICK),--quick,) $(if $(PHASES),--phases $(PHASES),)

# The chaos run starts its own PostgreSQL, Redis and Kafka on these ports and state directory
# (never the shared ones) and stops them afterwards; pass the defaults to run it on servers
# that are already up, e.g. after the suite: CHAOS_PG_PORT=5432 ... CHAOS_INFRA_DIR=.local
CHAOS_PG_PORT ?= 25432
CHAOS_REDIS_PORT ?= 26379
CHAOS_KAFKA_PORT ?= 29092
CHAOS_INFRA_DIR ?= .local/chaos
chaos: venv ## the city under a seeded fault schedule, then its invariants (QUICK=1: under 6 minutes; SEED=n)
	$(BIN)/python -m loadtests.chaos $(if $(QUICK),--quick,) $(if $(SEED),--seed $(SEED),) \
	  --pg-port $(CHAOS_PG_PORT) --redis-port $(CHAOS_REDIS_PORT) \
	  --kafka-port $(CHAOS_KAFKA_PORT) --infra-dir $(CHAOS_INFRA_DIR)

LOAD_SECONDS ?= 60
LOAD_USERS ?= 30
LOAD_CLASSES ?= ConnectorUser DriverUser OpsUser
load: bench-deps ## locust, headless and bounded, against `make up` (http://127.0.0.1:8000)
	@mkdir -p reports
	set -a; source deploy/local/real.env; set +a; $(BIN)/python -m loadtests.prepare_load
	CITYPARK_LOAD_MANIFEST=reports/load-manifest.json \
	CITYPARK_LOAD_ADMIN_TOKEN=$$(set -a; source deploy/local/real.env; source .env; set +a; $(BIN)/citypark admin token --role admin) \
	$(BIN)/locust -f loadtests/locustfile.py --headless -u $(LOAD_USERS) -r $(LOAD_USERS) \
	  -t $(LOAD_SECONDS)s --host http://127.0.0.1:8000 --csv reports/load --html reports/load.html \
	  --only-summary $(LOAD_CLASSES)

lint: venv ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean: infra-down ## stop everything and remove local data (keeps the venv)
	rm -rf .local
