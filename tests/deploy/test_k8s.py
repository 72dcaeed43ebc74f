"""deploy/k8s against the Kubernetes schemas, the real CLI parsers and a real server (no cluster here).

* every built-in object is validated with kubernetes-validate (strict: unknown fields fail) against
  the oldest and newest Kubernetes versions it knows that we support; the Prometheus Operator's
  ServiceMonitor (a CRD, no schema there) is checked structurally against the Service it scrapes;
* the containers' args are parsed with `nextoken serve` / `nextoken retrain`'s own parsers, and the
  ports, probe paths, volumes, secret and metric names are cross-checked;
* a real server started with the Deployment's flags answers the probes without credentials, as the
  kubelet sends none, and a real Prometheus scraping it with a pod's labels answers the
  prometheus-adapter rule's query with that pod's queue depth: the number the HPA scales on.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from nextoken.export.artifact import CURRENT
from tests.conftest import REPO, ServerProcess, free_port, metric
from tests.deploy.test_compose import parse, validated_serve_config

K8S = REPO / "deploy" / "k8s"
BASE = K8S / "base"
GPU = K8S / "overlays" / "gpu"
ADAPTER = K8S / "prometheus-adapter" / "values.yaml"
OLDEST = "1.29"  # autoscaling/v2 behavior, policy/v1, batch/v1 CronJob: all GA long before
API_KEY = "test-key-k8s"


def render(folder: Path) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k folder` would send (kustomize built into kubectl)."""
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    res = subprocess.run([exe, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return render(BASE)


@pytest.fixture(scope="module")
def gpu() -> list[dict[str, Any]]:
    return render(GPU)


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} objects named {name}"
    return found[0]


def container(objs: list[dict[str, Any]], kind: str = "Deployment") -> dict[str, Any]:
    pod = one(objs, kind)["spec"]
    pod = pod["jobTemplate"]["spec"]["template"]["spec"] if kind == "CronJob" else pod["template"]["spec"]
    assert len(pod["containers"]) == 1
    return pod["containers"][0]


def pod_spec(objs: list[dict[str, Any]], kind: str = "Deployment") -> dict[str, Any]:
    spec = one(objs, kind)["spec"]
    return spec["jobTemplate"]["spec"]["template"]["spec"] if kind == "CronJob" else spec["template"]["spec"]


# --- schemas ------------------------------------------------------------------------------------
def test_kubernetes_validate_rejects_a_broken_object() -> None:
    """The check itself can fail: a misspelt field, or a wrong type, is refused."""
    kv = pytest.importorskip("kubernetes_validate")
    good = yaml.safe_load((BASE / "pdb.yaml").read_text())
    kv.validate(good, OLDEST, strict=True)
    typo = json.loads(json.dumps(good))
    typo["spec"]["maxUnavaliable"] = typo["spec"].pop("maxUnavailable")
    with pytest.raises(kv.ValidationError):
        kv.validate(typo, OLDEST, strict=True)
    hpa = yaml.safe_load((BASE / "hpa.yaml").read_text())
    hpa["spec"]["minReplicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(hpa, OLDEST, strict=True)


@pytest.mark.parametrize("variant", ["base", "gpu"])
def test_every_builtin_object_matches_the_kubernetes_schemas(variant: str, request: pytest.FixtureRequest) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    objs = request.getfixturevalue(variant)
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "PersistentVolumeClaim",
            "CronJob", "ServiceMonitor"} <= kinds
    checked = 0
    for obj in objs:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            with pytest.raises(kv.SchemaNotFoundError):  # a CRD: checked below instead
                kv.validate(obj, OLDEST, strict=True)
            continue
        for version in (OLDEST, kv.latest_version()):
            kv.validate(obj, version, strict=True)
        assert obj["metadata"]["namespace"] == "nextoken"
        checked += 1
    assert checked == len(objs) - 1


def test_service_monitor_scrapes_every_pod_with_the_api_key(base: list[dict[str, Any]]) -> None:
    sm, svc = one(base, "ServiceMonitor"), one(base, "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm["spec"]) == {"selector", "endpoints"}
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (ep,) = sm["spec"]["endpoints"]
    assert set(ep) <= {"port", "path", "interval", "authorization", "scheme", "scrapeTimeout"}
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert ep["path"] == "/metrics" and re.fullmatch(r"\d+s", ep["interval"])
    # The same secret the server reads its key from.
    env = {e["name"]: e for e in container(base)["env"]}
    api_key_env = parse(container(base)["args"]).api_key_env
    assert ep["authorization"] == {"type": "Bearer", "credentials": env[api_key_env]["valueFrom"]["secretKeyRef"]}


# --- against the CLI and each other --------------------------------------------------------------
def test_server_pods_match_serve_cli_probes_ports_and_volume(base: list[dict[str, Any]]) -> None:
    c, pod = container(base), pod_spec(base)
    args = parse(c["args"])
    assert args.host == "0.0.0.0" and args.artifact_dir == f"/models/{CURRENT}"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": args.port}
    for probe, path in (("startupProbe", "/health"), ("livenessProbe", "/health"), ("readinessProbe", "/ready")):
        assert c[probe]["httpGet"] == {"path": path, "port": "http"}, probe
        assert c[probe]["timeoutSeconds"] < c[probe]["periodSeconds"]
    # Start-up may take minutes (the startup probe's budget) before liveness may restart the pod.
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 120
    # Draining: the pod is given its preStop pause plus the server's whole drain window.
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and 1 <= int(pre_stop[1]) <= 15
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + args.drain_timeout + 5
    # The API key comes from a secret, into the variable the server is told to read.
    env = {e["name"]: e for e in c["env"]}
    assert set(env[args.api_key_env]["valueFrom"]) == {"secretKeyRef"}
    # The models volume: the shared ReadWriteMany claim, read-only here.
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    models = mounts["/models"]
    assert models["readOnly"] is True
    vols = {v["name"]: v for v in pod["volumes"]}
    claim = vols[models["name"]]["persistentVolumeClaim"]["claimName"]
    assert one(base, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    # A read-only root filesystem needs a writable /tmp for the metrics directory.
    assert c["securityContext"]["readOnlyRootFilesystem"] is True and "emptyDir" in vols[mounts["/tmp"]["name"]]
    # Requests are set, and the CPU request covers ONNX Runtime's threads.
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert float(c["resources"]["requests"]["cpu"]) >= args.threads
    # The image's user owns what it writes (the Dockerfiles' uid).
    uid = re.search(r"useradd --uid (\d+)", (REPO / "docker" / "Dockerfile.serve").read_text()).group(1)
    assert pod["securityContext"]["runAsUser"] == int(uid) == pod_spec(base, "CronJob")["securityContext"]["fsGroup"]


def test_service_pdb_and_hpa_select_the_server_pods(base: list[dict[str, Any]]) -> None:
    dep = one(base, "Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    svc = one(base, "Service")
    assert svc["spec"]["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
    pdb = one(base, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = one(base, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    assert "replicas" not in dep["spec"]  # the HPA owns it
    # A node drain (the PDB's one pod) never leaves the Service empty.
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.fixture(scope="module")
def server_gauges() -> set[str]:
    from tests.deploy.test_monitoring import _NAMES

    out = subprocess.run([sys.executable, "-c", _NAMES], capture_output=True, text=True, check=True, timeout=60)
    return set(json.loads(out.stdout))


def test_hpa_metric_is_a_server_gauge_served_by_the_adapter_rule(base: list[dict[str, Any]],
                                                                 server_gauges: set[str]) -> None:
    (metric,) = one(base, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    name = metric["pods"]["metric"]["name"]
    assert name == "nextoken_requests_waiting" and name in server_gauges
    (rule,) = yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]
    assert re.match(r"^(\w+)\{", rule["seriesQuery"]).group(1) == name
    assert re.fullmatch(rule["name"]["matches"], name) and rule["name"]["as"] == name
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}


def test_retrain_cronjob_publishes_into_the_volume_the_servers_read(base: list[dict[str, Any]]) -> None:
    job, c, pod = one(base, "CronJob"), container(base, "CronJob"), pod_spec(base, "CronJob")
    args = parse(c["args"])
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    models = mounts[args.models_dir]
    assert not models.get("readOnly")
    server_vols = {v["name"]: v for v in pod_spec(base)["volumes"]}
    server_models = next(m for m in container(base)["volumeMounts"] if m["mountPath"] == "/models")
    assert (vols[models["name"]]["persistentVolumeClaim"]["claimName"]
            == server_vols[server_models["name"]]["persistentVolumeClaim"]["claimName"])
    assert args.data == ["/data"] and mounts["/data"]["readOnly"] is True
    assert args.mode == "auto"
    # Two jobs at once would race for the next version number; a failure is not retried blindly.
    assert job["spec"]["concurrencyPolicy"] == "Forbid" and job["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 0
    assert pod["restartPolicy"] == "Never"
    # The work folder (default: a temporary one) is on a writable volume.
    assert args.work_dir is None and "emptyDir" in vols[mounts["/tmp"]["name"]]
    train_uid = re.search(r"useradd --uid (\d+)", (REPO / "docker" / "Dockerfile.train").read_text()).group(1)
    assert pod["securityContext"]["runAsUser"] == int(train_uid)


def test_gpu_overlay_serves_on_cuda_with_one_gpu(base: list[dict[str, Any]], gpu: list[dict[str, Any]]) -> None:
    c, cpu_c = container(gpu), container(base)
    args, cpu_args = parse(c["args"]), parse(cpu_c["args"])
    assert args.device == "cuda" and cpu_args.device == "cpu"
    assert c["image"].startswith("nextoken-serve-gpu:") and cpu_c["image"].startswith("nextoken-serve:")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1" == c["resources"]["requests"]["nvidia.com/gpu"]
    # Everything else carries over from the base: port, probes, volume, key, drain.
    assert (args.port, args.artifact_dir, args.api_key_env, args.drain_timeout) == (
        cpu_args.port, cpu_args.artifact_dir, cpu_args.api_key_env, cpu_args.drain_timeout)
    for key in ("startupProbe", "livenessProbe", "readinessProbe", "lifecycle", "volumeMounts", "env", "ports"):
        assert c[key] == cpu_c[key], key
    assert any(t["key"] == "nvidia.com/gpu" for t in pod_spec(gpu)["tolerations"])
    # The GPU image the overlay names is the one docker/ builds.
    assert (REPO / "docker" / "Dockerfile.serve-gpu").is_file()


# --- a real server and a real Prometheus --------------------------------------------------------
@pytest.mark.parametrize("variant", ["base", "gpu"])
def test_the_server_args_of_each_variant_start(variant: str, request: pytest.FixtureRequest,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = validated_serve_config(container(request.getfixturevalue(variant))["args"], monkeypatch)
    assert (cfg.device == "cuda") == (variant == "gpu")


def _flags_for_loopback(args: list[str]) -> list[str]:
    """The Deployment's flags, bound to loopback on ServerProcess's free port, one thread."""
    out, skip = [], {"--host", "--port", "--threads"}
    it = iter(args[2:])  # after `serve ARTIFACT`
    for a in it:
        if a in skip:
            next(it)
            continue
        out.append(a)
    return out


@pytest.fixture(scope="module")
def deployed(serve_artifact: Path):
    """A server with the Deployment's flags; batch 1 so queue depth is easy to make."""
    args = container(render(BASE))["args"]
    env_name = parse(args).api_key_env
    s = ServerProcess(serve_artifact, *_flags_for_loopback(args), "--max-batch-size", "1", "--max-queue", "4",
                      env={env_name: API_KEY})
    yield s
    s.stop()


def test_probes_answer_without_credentials(deployed: ServerProcess, base: list[dict[str, Any]]) -> None:
    c = container(base)
    assert httpx.get(deployed.url + "/v1/models", timeout=10).status_code == 401  # the key is really on
    for probe in ("startupProbe", "livenessProbe"):
        assert httpx.get(deployed.url + c[probe]["httpGet"]["path"], timeout=10).status_code == 200, probe
    ready = c["readinessProbe"]["httpGet"]["path"]
    assert httpx.get(deployed.url + ready, timeout=10).status_code == 200  # the kubelet sends no key


def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


def adapter_query(rule: dict[str, Any], namespace: str, pods: list[str]) -> str:
    """prometheus-adapter's rendering of metricsQuery for `GET .../pods/*/<metric>` in a namespace."""
    series = re.match(r"^(\w+)\{", rule["seriesQuery"]).group(1)
    matchers = f'namespace="{namespace}",pod=~"{"|".join(pods)}"'
    return (rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.LabelMatchers>>", matchers)
            .replace("<<.GroupBy>>", "pod"))


def test_adapter_rule_gives_the_hpa_each_pods_queue_depth(deployed: ServerProcess, tmp_path: Path,
                                                           base: list[dict[str, Any]]) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian package prometheus; .ci/run installs it)")
    (rule,) = yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]
    sm_ep = one(base, "ServiceMonitor")["spec"]["endpoints"][0]
    port = free_port()
    # What the Prometheus Operator makes of the ServiceMonitor: the pod's address, its namespace and
    # pod labels, the bearer key. Scraped often, so short queue states are seen.
    config = {"global": {"scrape_interval": "250ms", "scrape_timeout": "250ms"},
              "scrape_configs": [{"job_name": "nextoken", "metrics_path": sm_ep["path"],
                                  "authorization": {"type": "Bearer", "credentials": API_KEY},
                                  "static_configs": [{"targets": [deployed.url.split("//")[1]],
                                                      "labels": {"namespace": "nextoken", "pod": "server-a"}}]}]}
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                             "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clients = [httpx.Client(timeout=120) for _ in range(5)]  # 1 running (batch 1) + 4 queued (--max-queue 4)

    def open_stream(c: httpx.Client) -> None:
        req = c.build_request("POST", deployed.url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                              json={"prompt": "the", "max_tokens": 500, "ignore_eos": True, "stream": True})
        c.send(req, stream=True)  # returns at the first token; the rest is left unread

    def query(q: str) -> list[dict[str, Any]]:
        body = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": q}, timeout=10).json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def seen() -> tuple[dict[str, str], float] | None:
        result = query(q)
        assert len(result) <= 1, result
        return (result[0]["metric"], float(result[0]["value"][1])) if result else None

    q = adapter_query(rule, "nextoken", ["server-a", "server-b"])
    threads = [threading.Thread(target=open_stream, args=(c,)) for c in clients]
    try:
        _wait_port(port)
        # Before any traffic the series exists (pre-created) and says 0: the HPA has a value at once.
        deadline = time.monotonic() + 30
        first = None
        while first is None and time.monotonic() < deadline:
            first = seen()
            time.sleep(0.1)
        assert first == ({"pod": "server-a"}, 0.0)
        values: list[float] = []

        def watch(until: Callable[[], bool]) -> None:
            deadline = time.monotonic() + 60
            while not until():
                assert time.monotonic() < deadline, values
                got = seen()  # None right after a scrape that timed out on the busy machine (a stale series)
                if got is not None:
                    assert got[0] == {"pod": "server-a"}
                    values.append(got[1])
                time.sleep(0.05)

        auth = {"Authorization": f"Bearer {API_KEY}"}
        with deployed.engine_frozen():  # the five arrive together: one runs, four queue
            for t in threads:
                t.start()
            deployed.wait_until_full(headers=auth)
        deadline = time.monotonic() + 60
        while metric(deployed.url, "nextoken_requests_waiting", headers=auth) < 2:  # the pod reports a queue
            assert time.monotonic() < deadline, "the pod never reported its queue"
        with deployed.engine_frozen():  # held still until a scrape has carried it to the HPA's query
            queued = metric(deployed.url, "nextoken_requests_waiting", headers=auth)
            assert queued >= 1
            watch(lambda: values[-1:] == [queued])
        watch(lambda: not any(t.is_alive() for t in threads) and values[-1:] == [0.0])
        # The queue the HPA saw rose with the queued streams and fell back to 0 as they ran.
        assert set(values) <= {0.0, 1.0, 2.0, 3.0, 4.0}, values
    finally:
        for t in threads:
            t.join(60)
        for c in clients:
            c.close()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_kubernetes_and_compose_run_the_same_server_and_job(base: list[dict[str, Any]]) -> None:
    """One deployment story: the pods run what `docker compose` runs (only the thread count is pinned
    to the pod's CPU request here, where compose leaves the default)."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    k8s, dc = vars(parse(container(base)["args"])), vars(parse(compose["server"]["command"]))
    assert {k: v for k, v in k8s.items() if k != "threads"} == {k: v for k, v in dc.items() if k != "threads"}
    assert vars(parse(container(base, "CronJob")["args"])) == vars(parse(compose["retrain"]["command"]))
