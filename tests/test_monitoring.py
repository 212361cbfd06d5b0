"""deploy/monitoring/: the alert rules under promtool (their syntax and their unit tests), every
dashboard query parsed by promtool as a rule, the metric and label names both use against what
the servers expose (handler/metrics.yaml), and both ConfigMaps in the render of deploy/."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from handler.preprocessing import REFUSALS

REPO = Path(__file__).resolve().parent.parent
MONITORING = REPO / "deploy" / "monitoring"
RULES = MONITORING / "alerts.yaml"
RULE_TESTS = MONITORING / "alerts.test.yaml"
DASHBOARD = MONITORING / "dashboard.json"
# The labels the scrape adds (Prometheus' kubernetes-pods job), and the series from elsewhere than
# TorchServe: the scrape's own and kube-state-metrics'.
SCRAPE_LABELS = {"job", "instance", "namespace", "pod"}
EXTERNAL_LABELS = {"up": SCRAPE_LABELS, "kube_pod_status_ready": SCRAPE_LABELS | {"uid", "condition"}}
# Grafana's variables as concrete values, so that a panel's query is plain PromQL.
GRAFANA_VALUES = {"datasource": "prometheus", "model": "digits", "version": "1.0", "__rate_interval": "1m",
                  "__interval": "15s", "__range": "6h"}
GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")

# PromQL's tokens as far as selections go: what names no metric (strings, label matchers, ranges,
# comments), numbers and durations, names, and single characters.
PROMQL_TOKEN = re.compile(r"""(?P<skip>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|\{[^}]*\}|\[[^\]]*\]|\#[^\n]*)"""
                          r"|(?P<number>\d[\w.]*)|(?P<name>[A-Za-z_:][\w:]*)|(?P<other>\S)")
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = GROUPING | {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}


def promtool(*args: str) -> subprocess.CompletedProcess:
    path = shutil.which("promtool")
    if path is None:  # a core test: make install provides it
        pytest.fail("promtool not found: run `make install` (it installs Debian's prometheus)")
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=300, cwd=REPO)


def output(done: subprocess.CompletedProcess) -> str:
    return f"promtool {' '.join(done.args[1:])}:\n{done.stdout}{done.stderr}"


def selections(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """What a PromQL expression selects: {metric name: the labels its matchers name}, and the
    labels of its grouping clauses (by (...), on (...)). A metric is a name that is not a function
    or an aggregation (a name before "(", "by" or "without") nor a keyword. No maintained PromQL
    parser exists for Python and promtool prints no expression's selectors; a construct this
    misreads yields a name no metric has, which fails the tests rather than passing them."""
    tokens = [(m.lastgroup, m.group()) for m in PROMQL_TOKEN.finditer(expr)]
    selected: dict[str, set[str]] = {}
    grouping: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "name" and text.lower() in GROUPING and following == "(":
            end = next(j for j in range(i, len(tokens)) if tokens[j][1] == ")")
            grouping |= {t for k, t in tokens[i + 2:end] if k == "name"}
            i = end
        elif kind == "name" and text.lower() not in KEYWORDS and following != "(" \
                and following.lower() not in ("by", "without"):
            matchers = re.sub(r'"(?:[^"\\]|\\.)*"', "", following) if following.startswith("{") else ""
            selected.setdefault(text, set()).update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
        i += 1
    return selected, grouping


def exposed_labels() -> dict[str, set[str]]:
    """The series TorchServe exposes for handler/metrics.yaml, each with its labels: counters and
    gauges by their name, histograms by their _bucket (with le), _sum and _count; TorchServe adds
    Hostname to the model metrics, the scrape its own labels to all."""
    config = yaml.safe_load((REPO / "handler" / "metrics.yaml").read_text())
    out = {}
    for section, added in (("ts_metrics", set()), ("model_metrics", {"Hostname"})):
        for kind, metrics in config[section].items():
            for metric in metrics:
                labels = set(metric["dimensions"]) | added | SCRAPE_LABELS
                suffixes = {"": set()}
                if kind == "histogram":
                    suffixes = {"_bucket": {"le"}, "_sum": set(), "_count": set()}
                out |= {metric["name"] + suffix: labels | extra for suffix, extra in suffixes.items()}
    return out


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def alerts() -> dict[str, dict]:
    return {rule["alert"]: rule for rule in rules() if "alert" in rule}


def dashboard() -> dict:
    try:
        return json.loads(DASHBOARD.read_text())
    except json.JSONDecodeError as e:
        pytest.fail(f"{DASHBOARD.relative_to(REPO)}: not JSON: {e}")


def panels(board: dict) -> list[dict]:
    """Every panel that shows something, those inside rows too."""
    return [p for top in board["panels"] for p in [top, *top.get("panels", [])] if p["type"] != "row"]


def as_promql(query: str, where: str) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in GRAFANA_VALUES, f"{where}: unknown variable ${name} in {query}"
        return GRAFANA_VALUES[name]
    return GRAFANA_VARIABLE.sub(value, query)


def dashboard_queries() -> dict[str, list[tuple[str, str]]]:
    """Every query of the dashboard as PromQL, by where it is: a panel ('panel 2 "Latency"') or a
    variable; each as (its refId or name, the expression)."""
    board = dashboard()
    found = {}
    for var in board["templating"]["list"]:
        if var["type"] == "query":  # label_values(SELECTOR, LABEL): Grafana's, around a selector
            selector = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["definition"]).group(1)
            found[f"variable {var['name']}"] = [(var["name"], as_promql(selector, var["name"]))]
    for p in panels(board):
        where = f'panel {p["id"]} "{p["title"]}"'
        found[where] = [(t["refId"], as_promql(t["expr"], where)) for t in p.get("targets", [])]
    return found


def every_query() -> dict[str, list[str]]:
    """Every PromQL expression of the rules and the dashboard, by where it is."""
    found = {f'rule {rule.get("alert") or rule["record"]}': [rule["expr"]] for rule in rules()}
    return found | {where: [expr for _, expr in queries] for where, queries in dashboard_queries().items()}


def render_deploy() -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found: deploy/'s render is not checked (tests/images needs kubectl too)")
    done = subprocess.run([kubectl, "kustomize", str(REPO / "deploy")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


# --- the rules ----------------------------------------------------------------------------------

def test_rules_pass_promtool_check():
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, output(done)


def test_each_alert_fires_and_stays_quiet_as_its_promtool_unit_tests_say():
    done = promtool("test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, output(done)
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    for name in alerts():
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case["exp_alerts"] for case in mine), f"{name}: no unit test where it fires"
        assert any(not case["exp_alerts"] for case in mine), f"{name}: no unit test where it stays quiet"


def test_each_alert_waits_has_a_severity_and_says_what_to_do_with_a_runbook_anchor():
    for name, rule in alerts().items():
        assert rule.get("for"), f"{name}: no `for:` (one bad scrape would page)"
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert {"summary", "description"} <= rule["annotations"].keys(), name
        # the anchor GitHub makes of a heading "### <alert name>" in docs/observability.md
        assert rule["annotations"]["runbook_url"] == f"docs/observability.md#{name.lower()}", name
        runbook = (REPO / "docs" / "observability.md").read_text()
        assert f"\n### {name}\n" in runbook, f"{name}: no section '### {name}' in docs/observability.md"


def test_outcome_matchers_split_the_refusal_reasons_into_the_clients_and_the_servers():
    """Every Outcome=~ list of the rules and the dashboard is one of two: the server's failures
    (the failed-share rule's) and the clients' refusals; together exactly handler.preprocessing.REFUSALS,
    so a new reason fails here until the monitoring counts it."""
    queries = every_query()
    lists = {frozenset(m.split("|")) for exprs in queries.values() for e in exprs
             for m in re.findall(r'Outcome=~"([^"]+)"', e)}
    (failed,) = queries["rule model_version:classifier_images_failed:ratio_rate10m"]
    server = frozenset(re.search(r'Outcome=~"([^"]+)"', failed).group(1).split("|"))
    assert len(lists) == 2 and server in lists, lists
    (client,) = lists - {server}
    assert not client & server and client | server == set(REFUSALS)


# --- the dashboard ------------------------------------------------------------------------------

def test_every_dashboard_query_parses_as_promql(tmp_path):
    """Each panel's targets (and each variable's selector) as recording rules of one group named
    after the panel: promtool's error names the panel and the target."""
    groups = [{"name": where, "rules": [{"record": f"dashboard:{ref}", "expr": expr} for ref, expr in found]}
              for where, found in dashboard_queries().items()]
    assert all(group["rules"] for group in groups), [g["name"] for g in groups if not g["rules"]]
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, output(done)


def test_dashboard_reads_its_datasource_from_the_variable_and_has_model_and_version_variables():
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    assert {"model", "version"} <= variables.keys()
    for p in panels(board):  # imported anywhere: no panel names a datasource of this author's Grafana
        for item in [p, *p.get("targets", [])]:
            assert item.get("datasource", {}).get("uid") == "${datasource}", p["title"]


# --- metric and label names ---------------------------------------------------------------------

def test_selections_finds_the_selected_metrics_and_their_labels_only():
    expr = ('1 - histogram_quantile(0.5, sum by (ModelName, le) (rate(a_bucket{Outcome=~"x|y=",'
            ' le!="1"}[1h])))\n'
            '  / on (ModelName) group_left b:c:rate1h offset 1h > 1e6  # d is a comment\n'
            "  and sum(c) by (pod) unless max without (e) (f{g='h'}) > bool 0.5")
    assert selections(expr) == ({"a_bucket": {"Outcome", "le"}, "b:c:rate1h": set(), "c": set(), "f": {"g"}},
                                {"ModelName", "le", "pod", "e"})


def test_rules_and_dashboard_select_only_metrics_and_labels_the_servers_expose_or_the_rules_record():
    """Each metric is exposed (handler/metrics.yaml, or the scrape's and kube-state-metrics') or
    recorded by a rule; each label a matcher names is one of that metric's, and each label a
    clause groups by is one of the selected metrics'. A renamed metric or label fails here, where
    a panel would only go blank."""
    known = exposed_labels() | EXTERNAL_LABELS
    for rule in rules():  # a recorded series: the labels its rule groups by, else those it selects
        if "record" in rule:
            selected, grouping = selections(rule["expr"])
            known[rule["record"]] = grouping or set().union(*(known[name] for name in selected))
    wrong, seen = [], set()
    for where, exprs in every_query().items():
        for expr in exprs:
            selected, grouping = selections(expr)
            seen |= selected.keys()
            wrong += [f"{where}: metric {name}" for name in selected if name not in known]
            wrong += [f"{where}: {name}{{{label}}}" for name, labels in selected.items() if name in known
                      for label in sorted(labels - known[name])]
            offered = set().union(*(known.get(name, set()) for name in selected))
            wrong += [f"{where}: by/on ({label})" for label in sorted(grouping - offered)]
    assert not wrong, "neither exposed (handler/metrics.yaml) nor recorded:\n" + "\n".join(wrong)
    assert {"classifier_images_total", "classifier_top1_shortfall_bucket", "up"} <= seen  # the check saw them


# --- the ConfigMaps -----------------------------------------------------------------------------

def test_deploy_renders_the_rules_and_the_dashboard_as_config_maps_for_prometheus_and_grafana():
    maps = {d["metadata"]["name"]: d for d in render_deploy() if d["kind"] == "ConfigMap"}
    rules_map, dashboard_map = maps["ts-monitoring-rules"], maps["ts-grafana-dashboard"]
    for m in (rules_map, dashboard_map):
        assert m["metadata"]["namespace"] == "ts-batch-classify"
    assert rules_map["data"] == {"alerts.yaml": RULES.read_text()}
    assert dashboard_map["metadata"]["labels"]["grafana_dashboard"] == "1"  # what Grafana's sidecar watches
    # the sidecar writes each key as a file among every team's dashboards: a name of its own
    assert list(dashboard_map["data"]) == ["ts-batch-classify.json"]
    assert json.loads(dashboard_map["data"]["ts-batch-classify.json"]) == dashboard()
