"""The Prometheus alerting rules in etc/: valid, about metrics the tool exports, one alert
per problem.

With promtool (Debian's prometheus package; tools/install-deps installs it when it can),
``promtool check rules`` loads the file and ``promtool test rules`` runs
tests/prometheus/rules-test.yml, where three nodes report the same queues. Without it, the
file is parsed here and each rule's shape checked. Either way every metric an expression
names must be one that glance-image-sync exports.
"""

import pathlib
import re
import shutil
import subprocess

import pytest
import yaml
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from glance_image_sync.metrics import Metrics
from tests.helpers import settings_for

ROOT = pathlib.Path(__file__).resolve().parent.parent
RULES = ROOT / "etc/prometheus/glance-image-sync-rules.yml"
RULES_TEST = ROOT / "tests/prometheus/rules-test.yml"
ALERTS = {"GlanceImageSyncBacklogGrowing", "GlanceImageSyncEventsFailed",
          "GlanceImageSyncDeadLetters", "GlanceImageSyncNoSuccess", "GlanceImageSyncBrokerDown",
          "GlanceImageSyncBrokerUnreachable", "GlanceImageSyncMassDelete"}
PROMQL_WORDS = {"by", "on", "and", "or", "unless", "offset", "without", "ignoring",
                "group_left", "group_right", "bool", "sum", "min", "max", "avg", "count",
                "group", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values"}


def rules() -> list:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def exported_metric_names(tmp_path) -> set:
    """Every series name a daemon's registry can expose (the broker unreachable here)."""
    settings = settings_for(tmp_path, transport_url="rabbit://guest:guest@127.0.0.1:1/")
    names = set()
    for family in Metrics(settings).registry.collect():
        names.add(family.name)
        if isinstance(family, CounterMetricFamily) or family.type == "counter":
            names.add(family.name + "_total")
        if isinstance(family, HistogramMetricFamily) or family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        names |= {sample.name for sample in family.samples}
    return names


def metrics_named(expr: str) -> set:
    """The metric names in a PromQL expression: words that are not functions, keywords,
    label names or inside strings."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # strings: regexes, label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1",
                  expr)  # label lists
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    words = re.findall(r"\b[A-Za-z_:][A-Za-z0-9_:]*\b(?!\s*\()", expr)
    return {word for word in words if word not in PROMQL_WORDS
            and not re.fullmatch(r"\d+[smhdwy]", word)}


def test_every_alert_is_there_with_a_summary_and_a_severity():
    found = rules()
    assert {rule["alert"] for rule in found} == ALERTS
    for rule in found:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert re.fullmatch(r"\d+m", rule.get("for", "")), rule["alert"]


def test_expressions_name_only_metrics_the_tool_exports(tmp_path):
    exported = exported_metric_names(tmp_path)
    assert "glance_image_sync_queue_messages" in exported
    assert "glance_image_sync_last_success_timestamp_seconds" in exported
    for rule in rules():
        named = metrics_named(rule["expr"])
        assert named, rule["alert"]
        assert named <= exported, (rule["alert"], named - exported)


def test_the_metric_name_finder_finds_what_is_not_exported():
    assert metrics_named('max by (queue) (foo_total{queue=~"a.+"}[5m]) > bar offset 15m') == {
        "foo_total", "bar"}
    assert metrics_named("time() - x > 4 * 3600") == {"x"}


def test_queue_gauges_are_aggregated_so_three_nodes_make_one_alert():
    """Every node reports every queue: each use of a queue gauge is a max by queue (or by the
    node named in the queue), never per instance."""
    for rule in rules():
        uses = re.findall(r"(max by \((?:queue|node)\) \((?:label_replace\()?)?"
                          r"glance_image_sync_queue_messages", rule["expr"])
        assert all(uses), (rule["alert"], uses)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed "
                    "(Debian's prometheus package); the rules are parsed instead")
def test_promtool_loads_the_rules_and_their_tests_pass():
    checked = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in checked.stdout
    tested = subprocess.run(["promtool", "test", "rules", str(RULES_TEST)], capture_output=True,
                            text=True, timeout=120)
    assert tested.returncode == 0, tested.stdout + tested.stderr
