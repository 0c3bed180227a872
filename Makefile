# rkfilter — the two commands a newcomer needs are `make demo` and `make test`.
CARGO ?= cargo
RELEASE_BIN := target/release

.PHONY: all build release test lint unit e2e bench demo clean

all: build

build:
	$(CARGO) build --workspace

release:
	$(CARGO) build --workspace --release

# Everything: formatting, lints, unit + property tests, end-to-end tests that
# start the real programs. Root-only tests (mounts, fanotify) run when root.
test: lint build
	$(CARGO) test --workspace --no-fail-fast

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Benchmarks: a table on stdout and target/bench/rkbench.json. Each figure is
# printed beside its raw baseline measured in the same run.
bench: release
	$(RELEASE_BIN)/rkbench --json target/bench/rkbench.json $(BENCH_ARGS)

# The whole story on a temporary export: start filterd, open, crash, recover.
demo: release
	$(RELEASE_BIN)/rkdemo

clean:
	$(CARGO) clean
