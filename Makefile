# Two commands set everything up on a fresh Debian machine:
#   make demo   builds, installs what is missing, runs the main job on a datastore in a local file
#   make test   the whole suite: format check, clippy, every test (what CI runs)
SHELL := /bin/bash
CARGO ?= cargo
GUEST_ASSETS := build/guest/vmlinuz

.PHONY: demo test bench deps guest-assets build release fmt clippy clean

deps:
	@scripts/install-deps.sh

guest-assets: $(GUEST_ASSETS)
$(GUEST_ASSETS):
	@scripts/guest-assets.sh build/guest

build: deps
	$(CARGO) build --workspace --all-targets

release: deps
	$(CARGO) build --release --bin vapp

demo: release guest-assets
	@scripts/demo.sh target/release/vapp

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: deps guest-assets fmt clippy
	$(CARGO) test --workspace --no-fail-fast

bench: release guest-assets
	VAPP_BIN=$(CURDIR)/target/release/vapp $(CARGO) bench -p vapp-benches
	$(CARGO) run -q -p vapp-benches --bin bench-report

clean:
	$(CARGO) clean
	rm -rf build demo
