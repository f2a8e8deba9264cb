# The two commands a newcomer needs (both install what they need first):
#   make demo   a real three-node cluster on this machine: an image replicated, then deleted
#   make test   the whole test suite (unit, broker, cluster and systemd tiers)
.PHONY: deps demo test unit lint sample-config bench deb

deps:
	tools/install-deps

demo: deps
	.venv/bin/python -m tools.demo

# Two workers: every test's cluster has its own addresses, directories and vhost;
# the tests of an xdist_group (the systemd tier) all run on one of them.
test: deps lint
	.venv/bin/python -m pytest -n 2 --dist loadgroup --cov --cov-report=term
	.venv/bin/python -m tools.coverage_floor --total 85 --module 60

unit:
	.venv/bin/python -m pytest -m "not cluster and not broker and not systemd"

lint:
	.venv/bin/ruff check .

sample-config:
	PYTHON=.venv/bin/python tools/generate-sample-config

bench: deps
	.venv/bin/python -m bench.run --readme

# The Debian package, in dist/ (tools/build-deb installs Debian's build tools).
deb:
	tools/build-deb
