# vhost-user-ubd: build, test, demo, benchmarks.
# `make test` is what CI runs (.ci/run): it installs what it needs first.

SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all build release install install-files deps images lint unit test demo bench bench-handover bench-migration bench-network-base bench-density bench-merge bench-jobs crash-sweep handover-long fuzz clean

all: build

build:
	$(CARGO) build

release:
	$(CARGO) build --release

# Installs the binary, its man page (generated from the clap definitions),
# the systemd template units and the vhost-user JSON descriptor (whose
# binary path is the installed one). PREFIX (default /usr/local), DESTDIR
# for staging; install-files takes BIN (default the release build).
PREFIX ?= /usr/local
BIN ?= target/release/vhost-user-ubd
install: release install-files

install-files:
	install -Dm755 $(BIN) $(DESTDIR)$(PREFIX)/bin/vhost-user-ubd
	install -d $(DESTDIR)$(PREFIX)/share/man/man1
	$(BIN) man > $(DESTDIR)$(PREFIX)/share/man/man1/vhost-user-ubd.1
	install -Dm644 -t $(DESTDIR)$(PREFIX)/lib/systemd/system contrib/systemd/vhost-user-ubd@.socket contrib/systemd/vhost-user-ubd@.service
	sed -i 's|/usr/bin/vhost-user-ubd|$(PREFIX)/bin/vhost-user-ubd|g' $(DESTDIR)$(PREFIX)/lib/systemd/system/vhost-user-ubd@.service
	install -d $(DESTDIR)$(PREFIX)/share/qemu/vhost-user
	sed 's|"/usr/bin/vhost-user-ubd"|"$(PREFIX)/bin/vhost-user-ubd"|' contrib/50-vhost-user-ubd.json > $(DESTDIR)$(PREFIX)/share/qemu/vhost-user/50-vhost-user-ubd.json

# Debian packages for the interop, boot and benchmark runs (scripts/deps.sh):
# apt only when a binary is missing; QEMU from the suite of the installed
# qemu-utils (bookworm-backports for QEMU 10); never removes or downgrades.
deps:
	scripts/deps.sh

# Guest kernel + initramfs for the boot tests (cached in vm-images/cache).
images: deps
	vm-images/images.sh >/dev/null

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit:
	$(CARGO) test --lib

# Everything: lints, unit tests, integration tests (real UML tools, libblkio
# client over the socket, booted QEMU guests).
test: deps images lint
	$(CARGO) test --all-targets -- --test-threads=2

# The main job end to end: base image, COW, daemon, a QEMU guest that
# writes and verifies, a second boot, `info`, base hash unchanged.
demo: deps images release
	VUB_BIN=$(CURDIR)/target/release/vhost-user-ubd scripts/demo.sh

# vhost-user-ubd side by side with qemu-storage-daemon (same files, O_DIRECT,
# systems alternated, medians); writes BENCHMARKS.md. BENCH_SECONDS,
# BENCH_REPS, BENCH_ONLY tune it (bench/run.py).
bench: deps
	$(CARGO) build --release --workspace
	python3 bench/run.py
	python3 bench/scale.py

# The guest-visible stall of a live handover (bench/handover.py): a QEMU
# guest doing fio at queue depth 1 across 20 handovers, with QEMU's
# reconnect=1 and reconnect-ms=10; p50/max stall, failed or lost requests,
# normal latency. Writes bench/work/handover.md (BENCH_OUT); BENCH_HANDOVERS,
# BENCH_GAP, BENCH_SERVE_ARGS tune it.
bench-handover: deps images release
	python3 bench/handover.py

# Live migration of a booted guest (bench/migration.py): the guest of
# tests/boot_migration.rs (fio write/verify loop) migrated BENCH_MIGRATIONS
# times (5) between QEMUs, each on a new backend: vhost-user-ubd (serve
# --takeover CTL --socket NEW) and qemu-storage-daemon with a qcow2 overlay;
# downtime and total time from query-migrate (median, max), the storage
# switch's own time. Writes bench/work/migration.md (BENCH_OUT);
# BENCH_SYSTEMS, BENCH_GAP, BENCH_BANDWIDTH_MIB tune it.
bench-migration: deps images release
	python3 bench/migration.py

# Reads of base data through the daemon with the base on a network store
# (bench/network_base.py: qemu-nbd --read-only in a network namespace of its
# own, mounted with nbdfuse over a veth pair) and on a local file, side by
# side: cold (drop_caches, a fresh mount) and warm qd1 p50/p99 and qd32 IOPS,
# --cache writeback and none. Needs root. Writes bench/work/network_base.md
# (BENCH_OUT); BENCH_SECONDS, BENCH_REPS, BENCH_BASE_MIB, BENCH_CACHES tune it.
bench-network-base: deps
	$(CARGO) build --release --workspace
	python3 bench/network_base.py

# Density (bench/density.py): BENCH_DAEMONS (1000) daemons, each serving
# its own COW over one shared base, BENCH_GUESTS (8) of them a booted guest
# in turn: RSS, PSS, descriptors, threads, start-up; host MemAvailable.
# Writes bench/work/density.md (BENCH_OUT).
bench-density: deps images release
	python3 bench/density.py

# Offline merge (bench/merge.py): a 4 GiB COW with 20000 random 4 KiB
# writes over a 4 GiB base of non-zero data, merged by uml_moo and by
# `vhost-user-ubd merge` (images cmp-equal), warm and cold page cache.
# Writes bench/work/merge.md (BENCH_OUT); BENCH_SIZE_GIB, BENCH_WRITES,
# BENCH_REPS tune it.
bench-merge: deps
	$(CARGO) build --release
	python3 bench/merge.py

# Block jobs (bench/jobs.py): the disk's sequential bandwidth, a guest
# (ubd-bench, 4 KiB random reads and writes at qd1) idle and during a
# flatten and an export (unlimited and rate-limited), and the RSS of a
# daemon serving a 1 TiB COW with 512- and 4096-byte COW sectors. Writes
# bench/work/jobs.md (BENCH_OUT); BENCH_BASE_GIB, BENCH_SECONDS,
# BENCH_REPS, BENCH_RATES, BENCH_EXPORT_RATE tune it (about 8 minutes).
bench-jobs: deps
	$(CARGO) build --release --workspace
	python3 bench/jobs.py

# Larger seeded sweeps of the reliability tests.
crash-sweep:
	CRASH_STATES=200000 $(CARGO) test --release --test crash_states -- --nocapture
	KILL_ITERS=100 $(CARGO) test --release --test kill9 -- --nocapture

# The booted-guest handover test (tests/boot_handover.rs) with 100
# handovers instead of 20 under the guest's write/verify loop.
handover-long: deps images
	HANDOVER_ROUNDS=100 $(CARGO) test --release --test boot_handover -- --nocapture

# Coverage-guided fuzzing (libFuzzer through cargo-fuzz; the stable
# toolchain is allowed its -Z flags with RUSTC_BOOTSTRAP). FUZZ_SECONDS per
# target. Crashes land in fuzz/artifacts/; copy them into fuzz/corpus/<target>/
# so that `make test` replays them (tests/fuzz_replay.rs).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := request cow_header disk_ops
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/corpus/$$t; \
	  RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $$t fuzz/corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) \
	    -print_final_stats=1 2>&1 | grep -E "stat::number_of_executed_units|Done|ERROR|crash" ; \
	done

clean:
	$(CARGO) clean
