"""infra/ checked offline: compose.yaml against the compose-spec schema, every Kubernetes manifest and
the work pool's Job against Kubernetes' own schemas (strict: unknown fields fail), and the wiring
between files: env vars listed, mounted files present, `--set` switches that config.py accepts,
Dockerfile installing what pyproject declares. No container engine or cluster is needed (or used).
"""
from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from components import config as cfg

INFRA = Path(__file__).resolve().parents[2] / "infra"
REPO = INFRA.parent
K8S_VERSION = "1.37.0"
VAR = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def env_example() -> dict[str, str]:
    out = {}
    for line in (INFRA / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR:?error}; $$ is a literal $."""
    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op and op.endswith("?"):
            raise KeyError(f"{name} is required: {arg}")
        return arg or ""
    return VAR.sub(sub, text.replace("$$", "\0")).replace("\0", "$")


def compose() -> dict:
    return yaml.safe_load(interpolate((INFRA / "compose.yaml").read_text(), env_example()))


def k8s_docs() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted((INFRA / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


# ----------------------------------------------------------------------------- compose
def test_compose_matches_the_compose_spec_schema():
    import jsonschema
    from importlib import resources

    schema = json.loads((resources.files("check_jsonschema") / "builtin_schemas/vendor/compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    doc = compose()
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, errors
    # The validator is not a no-op: a misspelt service key is rejected.
    bad = copy.deepcopy(doc)
    bad["services"]["redis"]["helthcheck"] = bad["services"]["redis"].pop("healthcheck")
    assert list(validator.iter_errors(bad))


def test_compose_runs_every_engine_the_issue_names():
    services = compose()["services"]
    for name in ("postgres", "minio", "mlflow", "prefect-server", "prefect-worker", "redis", "server-1", "server-2", "lb"):
        assert name in services, name
    mlflow_cmd = (INFRA / "mlflow" / "start.sh").read_text()
    assert "--app-name basic-auth" in mlflow_cmd and "--artifacts-destination" in mlflow_cmd
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert services["mlflow"]["environment"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "--type process" in " ".join(services["prefect-worker"]["command"])
    for replica in ("server-1", "server-2"):
        svc = services[replica]
        assert "/readyz" in " ".join(svc["healthcheck"]["test"])
        assert svc["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert replica in services["lb"]["depends_on"]
    balancer = yaml.safe_load((INFRA / "traefik" / "llmcycle.yaml").read_text())["http"]["services"]["llmcycle"]
    assert balancer["loadBalancer"]["healthCheck"]["path"] == "/readyz"
    assert [s["url"] for s in balancer["loadBalancer"]["servers"]] == ["http://server-1:8000", "http://server-2:8000"]


def test_compose_wiring_is_consistent():
    doc = compose()
    services, volumes = doc["services"], set(doc.get("volumes") or {})
    for name, svc in services.items():
        for dep in svc.get("depends_on") or {}:
            assert dep in services, f"{name} depends on unknown service {dep}"
        for vol in svc.get("volumes") or []:
            src = vol.split(":", 1)[0]
            if src.startswith("."):
                assert (INFRA / src).exists(), f"{name} mounts missing {src}"
            else:
                assert src in volumes, f"{name} uses undeclared volume {src}"
    # start.sh's required variables are all given to the mlflow service.
    required = set(re.findall(r': "\$\{([A-Z_]+):\?', (INFRA / "mlflow" / "start.sh").read_text()))
    assert required and required <= set(services["mlflow"]["environment"]), required - set(services["mlflow"]["environment"])
    for script in ("mlflow/start.sh", "postgres/init-databases.sh"):
        subprocess.run(["sh", "-n", str(INFRA / script)], check=True)


def test_every_compose_variable_is_in_env_example():
    used = {m.group(1) for m in VAR.finditer((INFRA / "compose.yaml").read_text())}
    listed = set(env_example())
    assert used - listed == set(), f"missing from infra/.env.example: {sorted(used - listed)}"
    assert listed - used == set(), f"listed but unused in compose.yaml: {sorted(listed - used)}"
    # A required secret left unset fails loudly (compose's ${VAR:?message}).
    without = {k: v for k, v in env_example().items() if k != "POSTGRES_PASSWORD"}
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        interpolate((INFRA / "compose.yaml").read_text(), without)


# ----------------------------------------------------------------------------- kubernetes
@pytest.mark.parametrize("name,doc", k8s_docs(), ids=lambda v: v if isinstance(v, str) else v.get("kind", "?"))
def test_k8s_manifest_matches_kubernetes_schema(name, doc):
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_k8s_validator_rejects_a_misspelt_field():
    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError

    deploy = next(d for n, d in k8s_docs() if d["kind"] == "Deployment" and n == "server.yaml")
    bad = copy.deepcopy(deploy)
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pth"] = "/readyz"
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def render_job_template() -> dict:
    """The work pool's job_manifest with every {{ var }} replaced by the variable's default (as Prefect does)."""
    tmpl = json.loads((INFRA / "k8s" / "prefect-base-job-template.json").read_text())
    defaults = {k: v.get("default") for k, v in tmpl["variables"]["properties"].items()}

    def render(node):
        if isinstance(node, str):
            m = re.fullmatch(r"\{\{ (\w+) \}\}", node)
            if m:
                return defaults[m.group(1)]
            return re.sub(r"\{\{ (\w+) \}\}", lambda mm: str(defaults[mm.group(1)]), node)
        if isinstance(node, dict):
            return {k: render(v) for k, v in node.items()}
        if isinstance(node, list):
            return [render(v) for v in node]
        return node
    return render(tmpl["job_configuration"]["job_manifest"])


def test_prefect_kubernetes_base_job_template_renders_a_valid_job():
    import kubernetes_validate

    job = render_job_template()
    job["metadata"]["generateName"] = job["metadata"]["generateName"].lower()
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["prefect", "flow-run", "execute"]


def test_k8s_server_training_and_secrets_are_wired():
    docs = k8s_docs()
    by = {(d["kind"], d["metadata"]["name"]): d for _, d in docs}
    server = by[("Deployment", "llmcycle-server")]["spec"]["template"]["spec"]["containers"][0]
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
    hpa = by[("HorizontalPodAutoscaler", "llmcycle-server")]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "llmcycle-server" and hpa["minReplicas"] >= 2
    secrets = {name for kind, name in by if kind == "Secret"}
    configmaps = {name for kind, name in by if kind == "ConfigMap"}
    tmpl_refs = render_job_template()["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    for _, d in docs:
        spec = d.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []):
            for ref in c.get("envFrom", []) + tmpl_refs:
                if "secretRef" in ref:
                    assert ref["secretRef"]["name"] in secrets
                else:
                    assert ref["configMapRef"]["name"] in configmaps
    assert {"LLMCYCLE_API_KEYS", "LLMCYCLE_ADMIN_KEY"} <= set(by[("Secret", "llmcycle-api-keys")]["stringData"])
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(by[("Secret", "llmcycle-mlflow")]["stringData"])
    job = by[("Job", "llmcycle-pretrain")]["spec"]
    args = job["template"]["spec"]["containers"][0]["args"][0]
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"]
    for needle in ("torchrun", "--rdzv-backend=c10d", "--node-rank=\"$JOB_COMPLETION_INDEX\"",
                   "pretrain.strategy=fsdp", "pretrain.num_nodes=\"$NUM_NODES\"", "pretrain.devices=\"$GPUS_PER_NODE\""):
        assert needle in args, needle
    assert f"{job['template']['spec']['subdomain']}-0.{job['template']['spec']['subdomain']}:29400" in args


# ----------------------------------------------------------------------------- switches and image
def set_overrides() -> list[str]:
    """Every `--set key=value` / `overrides` entry the infra files pass, with example values for $VARs."""
    sets: list[str] = []
    texts = [(INFRA / "compose.yaml").read_text()] + [p.read_text() for p in (INFRA / "k8s").glob("*.yaml")]
    for text in texts:
        sets += re.findall(r'--set"?,? "?([a-z_.]+=(?:"[^"]*"|[^"\s\]]+))', text)
    prefect = yaml.safe_load((INFRA / "prefect" / "prefect.yaml").read_text())
    for dep in prefect["deployments"]:
        sets += dep["parameters"]["overrides"]
    example = {"NUM_NODES": "2", "GPUS_PER_NODE": "8", "LLMCYCLE_DVC_REMOTE": "s3://b/data",
               "LLMCYCLE_REDIS_URL": "redis://r:6379/0"}
    return [re.sub(r'"?\$(\w+)"?|\{\{ \$(\w+) \}\}', lambda m: example[m.group(1) or m.group(2)], s) for s in sets]


def test_infra_switches_are_keys_config_accepts(tmp_path):
    sets = set_overrides()
    keys = {s.split("=", 1)[0] for s in sets}
    assert {"serving.rate_limit.storage", "data.remote", "pretrain.strategy", "pretrain.num_nodes",
            "pretrain.devices"} <= keys, keys
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    settings = cfg.load(tmp_path / "params.yaml", sets)
    assert settings.pretrain.strategy == "fsdp" and settings.pretrain.num_nodes == 2
    assert settings.serving.rate_limit.storage.startswith("redis://")


def test_prefect_deployments_point_at_project_flows():
    prefect = yaml.safe_load((INFRA / "prefect" / "prefect.yaml").read_text())
    names = {d["name"]: d for d in prefect["deployments"]}
    assert set(names) == {"lifecycle", "monitor", "retrain"}
    assert names["retrain"]["triggers"][0]["expect"] == ["llmcycle.drift.detected"]
    assert names["monitor"]["schedules"]
    missing = []
    for dep in names.values():
        path, func = dep["entrypoint"].split(":")
        if not (REPO / path).exists():
            missing.append(dep["entrypoint"])
            continue
        assert re.search(rf"^def {func}\(", (REPO / path).read_text(), re.M), dep["entrypoint"]
    assert missing == [], f"deployment entrypoints that do not exist: {missing}"


def test_dockerfile_installs_what_pyproject_declares():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    docker = (INFRA / "Dockerfile").read_text()
    torch_pin = next(d for d in project["dependencies"] if d.startswith("torch=="))
    assert f"ARG TORCH_VERSION={torch_pin.split('==')[1]}" in docker
    assert re.search(r'pip install "torch==\$\{TORCH_VERSION\}" --index-url "\$\{TORCH_INDEX\}"', docker)
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in docker
    extras = re.search(r"ARG EXTRAS=(\S+)", docker).group(1).split(",")
    assert set(extras) <= set(project["optional-dependencies"]), extras
    assert 'pip install -e ".[${EXTRAS}]"' in docker
    # torch before the project (TRAPS.md), and every package the wheel includes is copied in first.
    assert docker.index("torch==${TORCH_VERSION}") < docker.index('pip install -e')
    copied = {w for line in docker.splitlines() if line.startswith("COPY") for w in shlex.split(line)[1:-1]}
    packages = {p.rstrip("*") for p in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
                ["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml", "params.yaml", "dvc.yaml", "dvc.lock"} <= copied, copied
    for f in copied:
        assert (REPO / f).exists(), f
    assert re.search(r'CMD \["llmcycle", "serve"', docker)
