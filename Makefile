# rkfilter — the two commands a newcomer needs are `make demo` and `make test`.
CARGO ?= cargo
RELEASE_BIN := target/release

.PHONY: all build protoc etcd smbvenv samba release test lint bench demo demo-cluster smb-compare fuzz soak soak-etcd clean

all: build

build: protoc
	$(CARGO) build --workspace

release: protoc
	$(CARGO) build --workspace --release

# The etcd client (libfilter feature `etcd`, on in filterd and filterctl)
# compiles etcd's protobuf definitions at build time: protoc must be there.
protoc:
	@command -v protoc >/dev/null 2>&1 || { \
	  echo "installing protobuf-compiler (protoc, needed to build the etcd client)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq protobuf-compiler; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq protobuf-compiler; fi; }

# Everything: formatting, lints, unit + property tests, end-to-end tests that
# start the real programs. Root-only tests (mounts, fanotify) run when root,
# and so does the non-root run: tests/tests/nonroot.rs starts filterd as uid
# 65534 (setpriv) on an export and state dir it owns.
#
# The end-to-end files spend most of their time waiting on the programs
# they start (tests/tests/rksmbd.rs: 115 s of CPU over 308 s with two
# test threads), so tests run TEST_THREADS at a time; those with an export
# mount of their own (filterd mediating local opens) still run at most two
# at a time (tests/src/lib.rs, MOUNTED_AT_ONCE).
TEST_THREADS ?= 4
test: lint build
	RUST_TEST_THREADS=$(TEST_THREADS) $(CARGO) test --workspace --no-fail-fast

lint: protoc
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Installs Debian packages (as root, or through sudo).
APT_INSTALL = if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $(1); \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq $(1); fi

# smbprotocol (PyPI), the real SMB 3 client of `make demo`, `make bench` and
# the rksmbd tests, in a venv under target/ (the tests make the same one).
SMBVENV := target/smbvenv
SMBPROTOCOL := smbprotocol==1.17.0
smbvenv:
	@$(SMBVENV)/bin/python -c 'import smbprotocol' 2>/dev/null || { \
	  { python3 -m venv --clear $(SMBVENV) >/dev/null 2>&1 || { \
	    echo "installing python3-venv (the venv smbprotocol runs in)"; \
	    $(call APT_INSTALL,python3-venv); python3 -m venv --clear $(SMBVENV); }; } && \
	  $(SMBVENV)/bin/pip install -q $(SMBPROTOCOL); }

# Benchmarks: a table on stdout and target/bench/rkbench.json. Each figure is
# printed beside its raw baseline measured in the same run; rksmbd's rows
# beside smbshim's and, when smbd is installed, Samba's.
bench: release smbvenv
	$(RELEASE_BIN)/rkbench --json target/bench/rkbench.json --smb-python $(SMBVENV)/bin/python $(BENCH_ARGS)

# The whole story on a temporary export: start filterd, open, crash, recover;
# then a real SMB 3 client (smbprotocol) keeps its handle across rksmbd's death.
demo: release smbvenv
	$(RELEASE_BIN)/rkdemo --smb-python $(SMBVENV)/bin/python

# smbtorture's suites against Samba's smbd and against rksmbd, side by side
# (tools/smb-compare.sh; installs samba and samba-testsuite when missing).
# Not part of `make test`; takes several minutes.
smb-compare: build samba
	tools/smb-compare.sh target/debug $(SMB_SUITES)

samba:
	@command -v smbd >/dev/null 2>&1 && command -v smbtorture >/dev/null 2>&1 || { \
	  echo "installing samba and samba-testsuite (smbd and smbtorture)"; \
	  $(call APT_INSTALL,samba samba-testsuite); }

# The two-machine story: a 3-member etcd on loopback holds the table; node
# A is killed and node B (--standby) takes over its clients' handles.
# Needs etcd (Debian's etcd-server, installed here when missing).
demo-cluster: release etcd
	$(RELEASE_BIN)/rkdemo --cluster

etcd:
	@command -v etcd >/dev/null 2>&1 || { \
	  echo "installing etcd-server (the etcd the two-machine demo runs)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq etcd-server; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq etcd-server; fi; }

# Fault soak: clients of both protocols while a chaos loop SIGKILLs
# smbshim, nfsshim and filterd, and restarts filterd while a frontend is
# stopped (SIGSTOP) and the other protocol locks a file both have open;
# prints a summary, fails on any violation (a write inside the lock among them).
# `make test` runs a 20 s profile (tests/tests/soak.rs).
SOAK_SECONDS ?= 300
SOAK_CLIENTS ?= 8
soak: release
	$(RELEASE_BIN)/rksoak --seconds $(SOAK_SECONDS) --clients $(SOAK_CLIENTS)

# The same soak with the table in a one-member etcd (`rksoak --etcd`).
soak-etcd: release etcd
	$(RELEASE_BIN)/rksoak --etcd --seconds $(SOAK_SECONDS) --clients $(SOAK_CLIENTS)

# Fuzzing: the cargo-fuzz targets in fuzz/ (frame, LMDB record and line
# decoders, rksmbd's SMB2 requests and its SPNEGO/NTLMSSP decoders) from
# the checked-in seed corpus, FUZZ_SECONDS each. Builds on the stable
# toolchain (--sanitizer none); installs cargo-fuzz if missing.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := wire_frames store_records shim_lines smbl_requests nfsl_requests \
	smb2_requests smb2_auth
fuzz: release
	command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	fuzz/run.sh $(FUZZ_SECONDS) $(FUZZ_TARGETS)

clean:
	$(CARGO) clean
