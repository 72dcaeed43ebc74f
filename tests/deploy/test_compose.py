"""docker-compose.yml, its GPU override and the Dockerfiles against the code they run (no drift).

There is no Docker engine here: `docker-compose config` validates the files, and the commands,
ports, env vars and volume paths in them are parsed with the real CLI parsers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from nextoken import cli_models, cli_retrain, cli_serve
from nextoken.export.artifact import CURRENT
from nextoken.serve.config import ServeConfig, from_args
from tests.conftest import REPO

COMPOSE = REPO / "docker-compose.yml"
GPU = REPO / "docker-compose.gpu.yml"
DOCKER = REPO / "docker"
ENV_EXAMPLE = DOCKER / "nextoken.env.example"
# what `nextoken COMMAND` parses with (nextoken.cli.COMMANDS)
SUBCOMMANDS: dict[str, ModuleType] = {"serve": cli_serve, "retrain": cli_retrain, "models": cli_models}


class ParseError(AssertionError):
    pass


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse `nextoken ARGV` with the subcommand's real parser; an unknown flag or bad value fails."""
    assert argv and argv[0] in SUBCOMMANDS, f"not a nextoken subcommand: {argv}"
    parser = argparse.ArgumentParser(prog=f"nextoken {argv[0]}")

    def error(message: str) -> None:
        raise ParseError(f"`nextoken {shlex.join(argv)}`: {message}")

    parser.error = error  # type: ignore[method-assign]
    SUBCOMMANDS[argv[0]].add_arguments(parser)
    for action in parser._actions:  # subparsers (`models list`) report through their own error()
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.error = error  # type: ignore[method-assign]
    return parser.parse_args(argv[1:])


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def dockerfile(path: Path) -> dict[str, str]:
    """The last value of each instruction, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^(FROM|USER|ENTRYPOINT|CMD|HEALTHCHECK|EXPOSE|VOLUME)\s+(.*)$", line.strip())
        if m:
            out[m.group(1)] = m.group(2)
    return out


def env_keys(path: Path) -> set[str]:
    keys = set()
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.add(line.split("=", 1)[0])
    return keys


def health_port(test: list[str] | str) -> int:
    m = re.search(r"http://127\.0\.0\.1:(\d+)/health\b", test if isinstance(test, str) else " ".join(test))
    assert m, f"healthcheck does not probe /health: {test}"
    return int(m.group(1))


def test_parse_rejects_drift() -> None:
    """The checker itself: a flag the server does not have, or a bad choice, fails."""
    with pytest.raises(ParseError, match="unrecognized arguments: --gpus"):
        parse(["serve", "/models/current", "--gpus", "1"])
    with pytest.raises(ParseError, match="invalid choice"):
        parse(["serve", "/models/current", "--device", "tpu"])
    with pytest.raises(ParseError, match="invalid int"):
        parse(["retrain", "--keep", "many"])
    assert parse(["models", "list", "--models-dir", "/models"]).action == "list"


def test_server_command_matches_serve_cli_port_env_and_volume() -> None:
    compose = load(COMPOSE)
    server = compose["services"]["server"]
    entrypoint = json.loads(dockerfile(DOCKER / "Dockerfile.serve")["ENTRYPOINT"])
    assert entrypoint == ["nextoken"]
    args = parse(server["command"])
    # The port: what the server binds is what the proxy forwards to, what Prometheus scrapes,
    # what the healthcheck probes and what the container exposes.
    assert args.host == "0.0.0.0"
    nginx = (DOCKER / "nginx.conf").read_text()
    assert re.findall(r"server server:(\d+)", nginx) == [str(args.port)]
    assert health_port(server["healthcheck"]["test"]) == args.port
    assert [int(p) for p in server["expose"]] == [args.port]
    prom = load(DOCKER / "prometheus" / "prometheus.yml")
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "nextoken")
    assert job["dns_sd_configs"][0]["names"] == ["server"] and job["dns_sd_configs"][0]["port"] == args.port
    assert job["metrics_path"] == "/metrics"
    # Clients reach the proxy; its published port maps onto the port nginx listens on.
    listen = int(re.search(r"listen\s+(\d+);", nginx).group(1))
    published = compose["services"]["proxy"]["ports"]
    assert len(published) == 1 and int(published[0].rsplit(":", 1)[1]) == listen
    # The API key: the env var the server is told to read is one the env file provides.
    assert args.api_key_env == "NEXTOKEN_API_KEY"
    env_file = server["env_file"]
    assert env_file == ["${NEXTOKEN_ENV_FILE:-docker/nextoken.env}"]
    default = env_file[0].split(":-", 1)[1].rstrip("}")
    assert (REPO / (default + ".example")) == ENV_EXAMPLE and args.api_key_env in env_keys(ENV_EXAMPLE)
    assert default in (REPO / ".gitignore").read_text().split()  # the real key is never committed
    assert compose["services"]["prometheus"]["env_file"] == env_file
    prom_entry = " ".join(compose["services"]["prometheus"]["entrypoint"])
    assert f"$${args.api_key_env}" in prom_entry and job["authorization"]["credentials_file"] in prom_entry
    # The models volume: the server serves <mount>/current, the pointer the registry maintains.
    mounts = dict(v.split(":")[:2] for v in server["volumes"])
    assert mounts["models"] == "/models" and args.artifact_dir == f"/models/{CURRENT}"
    assert "models" in compose["volumes"]


def test_retrain_job_matches_retrain_cli_and_shares_the_volume() -> None:
    compose = load(COMPOSE)
    job = compose["services"]["retrain"]
    assert job["profiles"] == ["retrain"]
    assert json.loads(dockerfile(DOCKER / "Dockerfile.train")["ENTRYPOINT"]) == ["nextoken"]
    args = parse(job["command"])
    mounts = dict(v.split(":")[:2] for v in job["volumes"])
    assert mounts["models"] == args.models_dir == "/models"
    assert mounts["./data"] == args.data[0]
    assert args.mode == "auto"  # first run from scratch with the preset, later runs continue
    assert job["build"]["dockerfile"] == "docker/Dockerfile.train"


def test_gpu_override_reserves_a_gpu_and_serves_on_cuda() -> None:
    server = load(GPU)["services"]["server"]
    args = parse(server["command"])
    assert args.device == "cuda" and args.artifact_dir == f"/models/{CURRENT}"
    assert args.port == parse(load(COMPOSE)["services"]["server"]["command"]).port
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert server["build"]["dockerfile"] == "docker/Dockerfile.serve-gpu"


def validated_serve_config(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> ServeConfig:
    """What `nextoken serve` would run for ``argv``: parsed, then ServeConfig.validate() (which names a bad flag)."""
    args = parse(argv)
    if args.api_key_env:
        monkeypatch.setenv(args.api_key_env, "set-by-the-deployment")
    return from_args(args).validate()


@pytest.mark.parametrize("where", ["docker-compose.yml", "docker-compose.gpu.yml", "Dockerfile.serve",
                                   "Dockerfile.serve-gpu"])
def test_every_shipped_serve_command_starts(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each command line a deployment ships passes the checks `nextoken serve` makes before it starts."""
    if where.startswith("docker-compose"):
        argv = load(REPO / where)["services"]["server"]["command"]
    else:
        argv = json.loads(dockerfile(DOCKER / where)["CMD"])
    cfg = validated_serve_config(argv, monkeypatch)
    assert (cfg.device == "cuda") == ("gpu" in where)
    assert cfg.prefix_cache_mb == (0 if cfg.device == "cuda" else 64)  # the default follows the device


@pytest.mark.parametrize("name", ["Dockerfile.serve", "Dockerfile.serve-gpu", "Dockerfile.train"])
def test_dockerfiles_run_real_commands_as_non_root(name: str) -> None:
    d = dockerfile(DOCKER / name)
    assert d["USER"] not in ("root", "0")
    args = parse(json.loads(d["CMD"]))
    text = (DOCKER / name).read_text()
    for src in re.findall(r"^COPY (?!--from)(\S+) ", text, flags=re.M):
        assert (REPO / src).exists(), f"{name} copies {src}, which does not exist"
    if name.startswith("Dockerfile.serve"):
        assert args.artifact_dir == f"/models/{CURRENT}" and health_port(d["HEALTHCHECK"]) == args.port
        assert d["EXPOSE"] == str(args.port)
        assert "torch" not in text.replace("'torch' not in", "")  # nothing installs PyTorch
        assert (args.device == "cuda") == (name == "Dockerfile.serve-gpu")


def test_serving_install_has_no_torch() -> None:
    """`pip install .` (the serving image) installs only the core dependencies: no PyTorch among them."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = [re.split(r"[<>=!\[; ]", d)[0].lower() for d in project["dependencies"]]
    assert "onnxruntime" in core and "litserve" in core and "tokenizers" in core
    assert not {"torch", "safetensors", "onnx", "onnxscript"} & set(core)
    code = ("import sys, nextoken.cli_serve, nextoken.runs.app, nextoken.registry, "
            "nextoken.export.artifact; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
    # The build context leaves out the virtualenv (it holds torch) and local models.
    assert {".venv", "models", "runs"} <= set((REPO / ".dockerignore").read_text().split())


def _compose_config(*files: Path) -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose; .ci/run installs it)")
    cmd = [exe, "--project-directory", str(REPO)]
    for f in files:
        cmd += ["-f", str(f)]
    env = {**os.environ, "NEXTOKEN_ENV_FILE": "docker/nextoken.env.example"}
    res = subprocess.run([*cmd, "config"], capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_docker_compose_config_accepts_the_files() -> None:
    merged = yaml.safe_load(_compose_config(COMPOSE))
    assert set(merged["services"]) == {"server", "proxy", "prometheus", "grafana", "retrain"}
    # The env file really is read: compose resolved the key into the server's environment.
    assert merged["services"]["server"]["environment"]["NEXTOKEN_API_KEY"] == "change-me"
    gpu = yaml.safe_load(_compose_config(COMPOSE, GPU))["services"]["server"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "--device" in gpu["command"] and gpu["volumes"]  # the override keeps the base's volume


def test_docker_compose_config_rejects_a_broken_file(tmp_path: Path) -> None:
    """The validation above can fail: an unknown key in a service is refused."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("    stop_grace_period: 40s", "    stop_grace_peroid: 40s"))
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed")
    res = subprocess.run([exe, "-f", str(broken), "--project-directory", str(REPO), "config", "-q"],
                         capture_output=True, text=True, cwd=REPO, timeout=60,
                         env={**os.environ, "NEXTOKEN_ENV_FILE": "docker/nextoken.env.example"})
    assert res.returncode != 0 and "stop_grace_peroid" in res.stderr
