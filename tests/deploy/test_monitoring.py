"""The shipped Prometheus config, rules and Grafana dashboard against the server's real metric names."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

PROM = REPO / "docker" / "prometheus"
GRAFANA = REPO / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "nextoken.json"
RAW_NAME = re.compile(r"(?<![\w:])nextoken_[a-z0-9_]+")
RECORDED_NAME = re.compile(r"(?<![\w:])nextoken:[a-z0-9_:]+")

# Builds the server's metrics in a fresh process (they register globally) and prints every
# sample name Prometheus will see: counters gain _total, histograms _bucket/_sum/_count.
_NAMES = textwrap.dedent("""
    import json, os, sys, tempfile
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp()
    from prometheus_client import REGISTRY
    from nextoken.serve.metrics import ServerMetrics
    ServerMetrics()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    names = [f.name + s for f in REGISTRY.collect() if f.name.startswith("nextoken_") for s in suffixes[f.type]]
    print(json.dumps(sorted(names)))
""")


@pytest.fixture(scope="module")
def server_metric_names() -> set[str]:
    out = subprocess.run([sys.executable, "-c", _NAMES], capture_output=True, text=True, check=True, timeout=60)
    names = set(json.loads(out.stdout))
    # Sanity: the figures an operator dashboard is built on are among them.
    assert {"nextoken_time_to_first_token_seconds_bucket", "nextoken_generation_tokens_total",
            "nextoken_requests_running", "nextoken_model_reload_failures_total"} <= names
    return names


def _exprs(obj: object) -> list[str]:
    """Every PromQL string in a dashboard: panel targets and template-variable queries."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("expr", "definition") and isinstance(v, str):
                found.append(v)
            else:
                found += _exprs(v)
    elif isinstance(obj, list):
        for v in obj:
            found += _exprs(v)
    return found


def _recorded() -> set[str]:
    rules = yaml.safe_load((PROM / "rules.yml").read_text())
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


def test_rules_reference_only_real_metrics(server_metric_names: set[str]) -> None:
    text = (PROM / "rules.yml").read_text()
    used = set(RAW_NAME.findall(text))
    assert used - server_metric_names == set()
    assert set(RECORDED_NAME.findall(text)) <= _recorded()
    rules = yaml.safe_load(text)
    alerts = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert "nextoken_model_reload_failures_total" in alerts["NextokenModelReloadFailed"]
    assert "nextoken:time_to_first_token_seconds:p99" in alerts["NextokenHighTimeToFirstToken"]
    for q in ("time_to_first_token_seconds", "inter_token_latency_seconds", "time_per_output_token_seconds"):
        for p in ("p50", "p99"):
            assert f"nextoken:{q}:{p}" in _recorded()
    assert {"nextoken:request_prefill_time_seconds:p99", "nextoken:request_decode_time_seconds:p99",
            "nextoken:engine_step_phase_seconds:p99", "nextoken:kv_cache_usage_ratio:max",
            "nextoken:requests_waiting:sum"} <= _recorded()
    assert "nextoken:kv_cache_usage_ratio:max" in alerts["NextokenKVCacheFull"]
    assert "nextoken:time_per_output_token_seconds:p99" in alerts["NextokenSlowDecode"]


def test_dashboard_references_only_real_metrics(server_metric_names: set[str]) -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = _exprs(dash)
    used = {n for e in exprs for n in RAW_NAME.findall(e)}
    assert used and used - server_metric_names == set()
    assert {n for e in exprs for n in RECORDED_NAME.findall(e)} <= _recorded()
    # The panels the issue asks for, each backed by the metric that answers it.
    by_title = {p["title"]: " ".join(_exprs(p)) for p in dash["panels"]}
    wanted = {
        "Time to first token": "nextoken_time_to_first_token_seconds_bucket",
        "Inter-token latency": "nextoken_inter_token_latency_seconds_bucket",
        "Tokens per second": "nextoken_generation_tokens_total",
        "Running and waiting requests": "nextoken_requests_waiting",
        "Errors by kind": "nextoken_errors_total",
        "Batch size per engine step": "nextoken_batch_size_sum",
        "KV-cache use": "nextoken_kv_cache_usage_ratio",
        "Time per output token": "nextoken_time_per_output_token_seconds_bucket",
        "Prefill and decode time per request": "nextoken_request_decode_time_seconds_bucket",
        "Engine step time by phase": "nextoken_engine_step_phase_seconds_bucket",
        "Queue depth per replica": "nextoken_requests_waiting",
        "Speculative decoding: acceptance": "nextoken_spec_decode_num_accepted_tokens_total",
        "Speculative decoding: acceptance by draft position": "nextoken_spec_decode_num_accepted_tokens_per_pos_total",
    }
    for title, metric in wanted.items():
        assert metric in by_title[title], title
    assert "0.99" in by_title["Time to first token"] and "0.5" in by_title["Time to first token"]
    assert "nextoken_request_prefill_time_seconds_bucket" in by_title["Prefill and decode time per request"]
    assert "phase" in by_title["Engine step time by phase"]
    # Every panel queries the provisioned datasource, and ids are unique.
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert ds["url"] == "http://prometheus:9090"
    assert {t["datasource"]["uid"] for p in dash["panels"] for t in p["targets"]} == {ds["uid"]}
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "nextoken.yml").read_text())
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in compose["volumes"])
    assert mounts["./docker/grafana/dashboards"] == provider["providers"][0]["options"]["path"]


def _promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    return exe


def test_promtool_accepts_config_and_rules(tmp_path: Path) -> None:
    exe = _promtool()
    # promtool checks that the credentials file exists; in the container the entrypoint writes it.
    # Only that one path is swapped for a file that exists here; rules.yml is checked beside it.
    config = (PROM / "prometheus.yml").read_text()
    key_path = yaml.safe_load(config)["scrape_configs"][0]["authorization"]["credentials_file"]
    (tmp_path / "key").write_text("k")
    (tmp_path / "prometheus.yml").write_text(config.replace(key_path, str(tmp_path / "key")))
    shutil.copy(PROM / "rules.yml", tmp_path / "rules.yml")
    res = subprocess.run([exe, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 rule files found" in res.stdout + res.stderr
    res = subprocess.run([exe, "check", "rules", str(PROM / "rules.yml")], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_rules_compute_the_right_numbers(tmp_path: Path) -> None:
    """`promtool test rules` on synthetic series: p50/p99 TTFT, tokens/s, and the reload-failure alert."""
    exe = _promtool()
    shutil.copy(PROM / "rules.yml", tmp_path / "rules.yml")
    m = 'model="tiny:2"'
    # 10 requests/s: 9 with TTFT <= 0.1 s, 1 in (0.25, 0.5]; 50 generated tokens/s.
    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "15s",
        "tests": [{
            "interval": "15s",
            "input_series": [
                {"series": f'nextoken_time_to_first_token_seconds_bucket{{{m},le="0.1"}}', "values": "0+135x20"},
                {"series": f'nextoken_time_to_first_token_seconds_bucket{{{m},le="0.25"}}', "values": "0+135x20"},
                {"series": f'nextoken_time_to_first_token_seconds_bucket{{{m},le="0.5"}}', "values": "0+150x20"},
                {"series": f'nextoken_time_to_first_token_seconds_bucket{{{m},le="+Inf"}}', "values": "0+150x20"},
                {"series": f'nextoken_generation_tokens_total{{{m},instance="a"}}', "values": "0+450x20"},
                {"series": f'nextoken_generation_tokens_total{{{m},instance="b"}}', "values": "0+300x20"},
                {"series": 'nextoken_model_reload_failures_total{model="tiny:3",reason="hash"}',
                 "values": "0 0 0 1 1 1 1 1 1 1"},
            ],
            "promql_expr_test": [
                # p50 falls in the first bucket: linear interpolation 0.1 * 0.5 / 0.9.
                # (In microseconds, rounded: promtool compares floats exactly.)
                {"expr": "round(nextoken:time_to_first_token_seconds:p50 * 1e6)", "eval_time": "4m",
                 "exp_samples": [{"labels": f"{{{m}}}", "value": round(1e6 * 0.1 * 0.5 / 0.9)}]},
                # p99 in (0.25, 0.5]: 0.25 + 0.25 * (0.99*10 - 9) / (10 - 9).
                {"expr": "round(nextoken:time_to_first_token_seconds:p99 * 1e6)", "eval_time": "4m",
                 "exp_samples": [{"labels": f"{{{m}}}", "value": round(1e6 * (0.25 + 0.25 * 0.9))}]},
                # Summed over replicas: (450 + 300) / 15 s.
                {"expr": "nextoken:generation_tokens:rate1m", "eval_time": "4m",
                 "exp_samples": [{"labels": f'nextoken:generation_tokens:rate1m{{{m}}}', "value": 50}]},
            ],
            "alert_rule_test": [
                {"alertname": "NextokenModelReloadFailed", "eval_time": "30s", "exp_alerts": []},
                {"alertname": "NextokenModelReloadFailed", "eval_time": "2m", "exp_alerts": [{
                    "exp_labels": {"severity": "critical", "model": "tiny:3", "reason": "hash"},
                    "exp_annotations": {"summary": "model version tiny:3 was refused (hash); the previous one "
                                                   "keeps serving"}}]},
            ],
        }],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    res = subprocess.run([exe, "test", "rules", "test.yml"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_new_rules_and_alerts_compute_the_right_numbers(tmp_path: Path) -> None:
    """TPOT and phase quantiles, queue depth over replicas, the fullest KV cache, a stuck engine, and
    a reload failure whose series is born at 1 (a new version's label: increase() alone misses it)."""
    exe = _promtool()
    shutil.copy(PROM / "rules.yml", tmp_path / "rules.yml")
    m = 'model="tiny:2"'

    def buckets(name: str, per_step: dict[str, int], extra: str = "") -> list[dict[str, str]]:
        return [{"series": f'{name}_bucket{{{m},{extra}le="{le}"}}', "values": f"0+{n}x80"}
                for le, n in per_step.items()]

    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "15s",
        "tests": [{
            "interval": "15s",
            "input_series": [
                # TPOT: 9 of 10 requests <= 10 ms, the tenth in (10, 25] ms.
                *buckets("nextoken_time_per_output_token_seconds", {"0.01": 9, "0.025": 10, "+Inf": 10}),
                # Prefill steps all in (5, 10] ms; decode steps all <= 1 ms.
                *buckets("nextoken_engine_step_phase_seconds", {"0.005": 0, "0.01": 4, "+Inf": 4}, 'phase="prefill",'),
                *buckets("nextoken_engine_step_phase_seconds", {"0.001": 10, "+Inf": 10}, 'phase="decode",'),
                {"series": f'nextoken_requests_waiting{{{m},instance="a"}}', "values": "3x80"},
                {"series": f'nextoken_requests_running{{{m},instance="a"}}', "values": "4x80"},
                {"series": f'nextoken_requests_waiting{{{m},instance="b"}}', "values": "2x80"},
                {"series": f'nextoken_requests_running{{{m},instance="b"}}', "values": "0x80"},  # stuck
                {"series": f'nextoken_kv_cache_usage_ratio{{{m},instance="a"}}', "values": "0.5x80"},
                {"series": f'nextoken_kv_cache_usage_ratio{{{m},instance="b"}}', "values": "0.97x80"},
                {"series": 'nextoken_model_reload_failures_total{model="tiny:4",reason="invalid artifact"}',
                 "values": "_x7 1x72"},
            ],
            "promql_expr_test": [
                # p50: 0.01 * 5 / 9 (first bucket); p99: 0.01 + 0.015 * (9.9 - 9) / (10 - 9). In microseconds.
                {"expr": "round(nextoken:time_per_output_token_seconds:p50 * 1e6)", "eval_time": "4m",
                 "exp_samples": [{"labels": f"{{{m}}}", "value": round(1e6 * 0.01 * 5 / 9)}]},
                {"expr": "round(nextoken:time_per_output_token_seconds:p99 * 1e6)", "eval_time": "4m",
                 "exp_samples": [{"labels": f"{{{m}}}", "value": round(1e6 * (0.01 + 0.015 * 0.9))}]},
                {"expr": "round(nextoken:engine_step_phase_seconds:p99 * 1e6)", "eval_time": "4m",
                 "exp_samples": [{"labels": f'{{{m},phase="prefill"}}', "value": round(1e6 * (0.005 + 0.005 * 0.99))},
                                 {"labels": f'{{{m},phase="decode"}}', "value": round(1e6 * 0.001 * 0.99)}]},
                {"expr": "nextoken:requests_waiting:sum", "eval_time": "4m",
                 "exp_samples": [{"labels": f"nextoken:requests_waiting:sum{{{m}}}", "value": 5}]},
                {"expr": "nextoken:kv_cache_usage_ratio:max", "eval_time": "4m",
                 "exp_samples": [{"labels": f"nextoken:kv_cache_usage_ratio:max{{{m}}}", "value": 0.97}]},
            ],
            "alert_rule_test": [
                {"alertname": "NextokenQueueBacklog", "eval_time": "1m", "exp_alerts": []},  # not for 2m yet
                {"alertname": "NextokenQueueBacklog", "eval_time": "4m", "exp_alerts": [{
                    "exp_labels": {"severity": "critical", "model": "tiny:2", "instance": "b"},
                    "exp_annotations": {"summary": "b has tiny:2 requests waiting but none running: its engine "
                                                   "is stuck"}}]},
                {"alertname": "NextokenKVCacheFull", "eval_time": "5m", "exp_alerts": []},
                {"alertname": "NextokenKVCacheFull", "eval_time": "12m", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "model": "tiny:2"},
                    "exp_annotations": {
                        "summary": "tiny:2 has had over 95% of its KV-cache slots holding tokens for 10 minutes",
                        "description": "Sequences are long for the batch: add replicas or lower --max-batch-size "
                                       "per replica."}}]},
                {"alertname": "NextokenModelReloadFailed", "eval_time": "1m", "exp_alerts": []},
                {"alertname": "NextokenModelReloadFailed", "eval_time": "2m", "exp_alerts": [{
                    "exp_labels": {"severity": "critical", "model": "tiny:4", "reason": "invalid artifact"},
                    "exp_annotations": {"summary": "model version tiny:4 was refused (invalid artifact); the "
                                                   "previous one keeps serving"}}]},
                {"alertname": "NextokenModelReloadFailed", "eval_time": "16m", "exp_alerts": []},  # resolved
            ],
        }],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    res = subprocess.run([exe, "test", "rules", "test.yml"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """Each panel's expression, with Grafana's variables filled in, loaded by promtool as a rule."""
    exe = _promtool()
    exprs = _exprs(json.loads(DASHBOARD.read_text()))
    filled = [e.replace("$__rate_interval", "1m").replace("$model", ".*") for e in exprs
              if not e.startswith("label_values(")]
    assert len(filled) >= 20
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:q{i}", "expr": e}
                                                         for i, e in enumerate(filled)]}]}
    (tmp_path / "dash.yml").write_text(yaml.safe_dump(rules))
    res = subprocess.run([exe, "check", "rules", str(tmp_path / "dash.yml")], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    # The check can fail: a broken expression is refused.
    (tmp_path / "bad.yml").write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": [
        {"record": "dashboard:bad", "expr": "sum by (model (rate(nextoken_generation_tokens_total[1m]))"}]}]}))
    res = subprocess.run([exe, "check", "rules", str(tmp_path / "bad.yml")], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode != 0
