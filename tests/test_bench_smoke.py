"""The benchmarks still run, and what they report hangs together.

No figure is compared with its target here (that is the benchmark's job, on a
quiet machine): each scenario runs at a tiny size on a real cluster, and its
numbers must be there, be measurements, and agree with the table row built
from them.
"""

import logging
import math

import pytest

from bench import relaying, run, scenarios

pytestmark = pytest.mark.cluster
MiB = scenarios.MiB

MACHINE = {"cpu": "a test machine", "memory": "-", "kernel": "-", "python": "-",
           "rabbitmq": "-", "rsync": "-"}
TINY = {
    "detection_latency": dict(events=5),
    "replication_time": dict(size=16 * MiB, rounds=1, quiet_wait=0.0),
    "replication_without_relay": dict(size=16 * MiB, rounds=1, quiet_wait=0.0),
    "idle_cost": dict(seconds=2),
    "memory_under_load": dict(size=32 * MiB),
    "fanout_throughput": dict(count=500, naive_count=100),
    "duplicate_events": dict(count=50, size=2 * MiB),
    "backlog": dict(images=4, size=2 * MiB),
    "backlog_persist_0": dict(images=4, size=2 * MiB),
}


def test_every_benchmark_has_a_tiny_size_here():
    assert set(TINY) == set(scenarios.ALL)


@pytest.mark.parametrize("name", sorted(scenarios.ALL))
def test_each_benchmark_runs_and_its_figures_agree_with_its_row(name):
    root = logging.getLogger()
    handlers = list(root.handlers)
    result = scenarios.ALL[name](**TINY[name])
    # The next scenario must not find this one's log handlers (oslo.log's, set
    # up in-process), writing into a cluster directory that is gone.
    assert root.handlers == handlers

    assert result.name == name
    numbers = {key: value for key, value in result.numbers.items()
               if isinstance(value, (int, float))}
    assert numbers, result.numbers
    for key, value in numbers.items():
        assert math.isfinite(value) and value >= 0, (key, value)
    assert isinstance(result.ok, bool)
    if "floor_seconds" in numbers:  # the rows measured against the floors
        assert numbers["seconds"] > 0 and numbers["floor_seconds"] > 0
        assert numbers["ratio"] == pytest.approx(numbers["seconds"] / numbers["floor_seconds"])
        assert numbers["verified_bound_seconds"] > numbers["floor_seconds"]
        assert f"{numbers['ratio']:.2f}x the floor" in result.measured

    table = run.markdown([result], MACHINE, 0.0)
    row = next(line for line in table.splitlines() if line.startswith(f"| {result.what} |"))
    assert row.endswith("| met |" if result.ok else "| **missed** |")
    assert result.measured in run.rst_table([result], MACHINE, 0.0)


def test_the_relay_rows_run_and_their_figures_agree_with_their_rows():
    rows = relaying.relay_scale(node_counts=(2, 3), size=2 * MiB)
    assert [row.name for row in rows] == ["relay_2", "relay_3"]
    for row in rows:
        numbers = row.numbers
        assert numbers["relay"] > 0 and numbers["naive"] > 0
        assert numbers["ratio_to_naive"] == pytest.approx(numbers["relay"] / numbers["naive"])
        # What the publisher's link sent was counted: at least one copy each way.
        assert numbers["publisher_sent"] >= 1 and numbers["naive_publisher_sent"] >= 1
        assert f"{numbers['relay']:.1f} s" in row.measured
        assert isinstance(row.ok, bool)
    # Three nodes without the relay: the publisher sends both copies.
    assert rows[1].numbers["naive_publisher_sent"] >= 2
    assert set(run.ALL) == set(scenarios.ALL) | {"relay_scale"}
