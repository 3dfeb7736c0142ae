# blackhole.py development tasks. POSIX make and shell; no third-party tools.

PYTHON ?= python3

# The test command; `make test-all` runs it with every interpreter it finds.
TEST_ARGS = -X dev -W error::ResourceWarning -m unittest discover -s tests -t .

# Interpreters test-all tries, in order; the first one of each X.Y wins.
# Names that are missing or do not run (a pyenv shim for a version that is
# not selected) are skipped.
PYTHON_CANDIDATES = $(PYTHON) \
	$(HOME)/.pyenv/versions/3.*/bin/python3 \
	/root/.pyenv/versions/3.*/bin/python3 \
	python3.8 python3.9 python3.10 python3.11 python3.12 python3.13 python3

# Prints "X.Y sys.executable" for CPython 3.8 or newer (so a pyenv shim
# resolves to the real binary) and nothing for anything else, Python 2
# included: sys.implementation is not reached there.
PROBE = import sys; v = sys.version_info; \
	print("%d.%d %s" % (v[0], v[1], sys.executable) \
	if v >= (3, 8) and sys.implementation.name == "cpython" else "")

# Shell pipeline printing one "X.Y /path/to/python" line per version, sorted.
FIND_PYTHONS = \
	for p in $(PYTHON_CANDIDATES); do \
		command -v "$$p" >/dev/null 2>&1 || continue; \
		"$$p" -c '$(PROBE)' 2>/dev/null || continue; \
	done | awk 'NF == 2 && !seen[$$1]++' | sort -t . -k 1,1n -k 2,2n

# Run by xargs as: sh -c '$(RUN_ONE)' sh DIR VERSION PATH. Output goes to
# DIR/VERSION.log, success leaves DIR/VERSION.ok, one line is printed.
RUN_ONE = \
	d=$$1; v=$$2; p=$$3; \
	if "$$p" $(TEST_ARGS) >"$$d/$$v.log" 2>&1; then \
		: >"$$d/$$v.ok"; r=ok; else r=FAILED; fi; \
	echo "test-all: python$$v ($$p): $$r:" `grep "^Ran " "$$d/$$v.log" | tail -n 1`

.PHONY: test test-all pythons run lint bench soak certs clean

test:
	$(PYTHON) $(TEST_ARGS)

test-all:
	@d=$${TMPDIR:-/tmp}/blackhole-test-all.$$$$; \
	rm -rf "$$d" && mkdir "$$d" || exit 1; \
	trap 'rm -rf "$$d"' EXIT; trap 'exit 130' HUP INT TERM; \
	( $(FIND_PYTHONS) ) >"$$d/pythons"; \
	versions=`cut -d ' ' -f 1 "$$d/pythons"`; \
	if [ -z "$$versions" ]; then \
		echo "test-all: no CPython 3.8 or newer found" >&2; exit 1; fi; \
	echo "test-all: running on python" $$versions; \
	xargs -n 2 -P 2 sh -c '$(RUN_ONE)' sh "$$d" <"$$d/pythons"; \
	failed=; \
	for v in $$versions; do \
		[ -f "$$d/$$v.ok" ] && continue; \
		failed="$$failed $$v"; \
		echo; echo "===== python$$v: output ====="; cat "$$d/$$v.log"; \
	done; \
	if [ -n "$$failed" ]; then \
		echo; echo "test-all: FAILED on python$$failed (ran:" $$versions")"; exit 1; fi; \
	echo "test-all: ok on python" $$versions

# Lists the interpreters test-all would use.
pythons:
	@$(FIND_PYTHONS)

run:
	$(PYTHON) blackhole.py -c blackhole.ini

lint:
	$(PYTHON) -W error -m py_compile blackhole.py
	$(PYTHON) -W error -c "import blackhole"
	$(PYTHON) -W error -m compileall -q -f tests bench

bench:
	$(PYTHON) bench/bench.py

soak:
	$(PYTHON) bench/soak.py

# Regenerates every file in tests/certs (the commands are in the script).
certs:
	sh tests/certs/make-certs.sh

clean:
	find . -name .git -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	find . -name .git -prune -o \( -name '*.py[co]' -o -name '*~' \) -type f -exec rm -f {} +
	rm -rf build dist .eggs *.egg-info .coverage .coverage.* htmlcov
