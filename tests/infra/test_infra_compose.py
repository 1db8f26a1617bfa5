"""The one-machine compose stack agrees with itself and with the package: services and
dependencies exist, MLflow's server points at the postgres service and at MinIO (with a bucket
that is created), the Ray nodes get the environment the package reads, and ports line up."""

import re
from pathlib import Path
from urllib.parse import urlparse

import pytest

from dictsweep.reference import ENVIRONMENT

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ray.scripts imports
COMPOSE_DIR = Path(__file__).resolve().parents[2] / "infra" / "compose"
RAY_SERVICES = ("ray-head", "ray-worker")


def option(args: list[str], name: str) -> str | None:
    """The value of `--name=value` or `--name value` in an argument list."""
    for index, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name:
            return args[index + 1]
    return None


def published(service: dict) -> dict[int, int]:
    """container port -> host port."""
    ports = {}
    for entry in service.get("ports", []):
        *_, host, container = str(entry).split(":")
        ports[int(container)] = int(host)
    return ports


def ray_start(service: dict):
    from ray.scripts.scripts import start

    assert service["command"][:2] == ["ray", "start"]
    return start.make_context("start", service["command"][2:])


def size_bytes(text: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)\s*([kmg]?)b?", text.lower()).groups()
    return float(number) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit]


def test_services_and_dependencies(compose):
    services = compose["services"]
    assert {"minio", "create-buckets", "postgres", "mlflow", "ray-head", "ray-worker"} <= set(services)
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            condition = condition["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], (
                    f"{name} waits for {dependency} to be healthy: no healthcheck"
                )
            else:
                assert condition == "service_completed_successfully"
                assert services[dependency].get("restart", "no") == "no", f"{dependency} is a one-shot init"


def test_our_services_run_the_dictsweep_image(compose, repo, version):
    for name in ("mlflow", *RAY_SERVICES):
        service = compose["services"][name]
        assert service["image"] == f"dictsweep:{version}", name
        assert (COMPOSE_DIR / service["build"]["context"]).resolve() == repo
        assert (repo / service["build"]["dockerfile"]).is_file()


def test_ray_nodes_get_the_environment_the_package_reads(compose):
    services = compose["services"]
    for name in RAY_SERVICES:
        env = services[name]["environment"]
        assert set(env) <= set(ENVIRONMENT), f"{name}: {set(env) - set(ENVIRONMENT)} are not read by dictsweep"
        assert {
            "MLFLOW_TRACKING_URI",
            "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
            "RAY_ADDRESS",
            "RAY_AUTH_MODE",
        } <= set(env), name
        assert env["RAY_AUTH_MODE"] == "disabled"  # a loopback dev cluster; clients set the same
        # S3: MinIO's API port, its root credentials
        endpoint = urlparse(env["AWS_ENDPOINT_URL"])
        minio = services["minio"]
        assert endpoint.hostname == "minio"
        assert f":{endpoint.port}" == option(minio["command"], "--address")
        assert env["AWS_ACCESS_KEY_ID"] == minio["environment"]["MINIO_ROOT_USER"]
        assert env["AWS_SECRET_ACCESS_KEY"] == minio["environment"]["MINIO_ROOT_PASSWORD"]
        # MLflow: the server's service and port
        tracking = urlparse(env["MLFLOW_TRACKING_URI"])
        assert tracking.hostname == "mlflow"
        assert str(tracking.port) == option(services["mlflow"]["command"], "--port")
    env = services["mlflow"]["environment"]
    assert set(env) <= set(ENVIRONMENT), f"mlflow: {set(env) - set(ENVIRONMENT)}"


def test_mlflow_server_uses_postgres_and_minio(compose):
    from mlflow.cli import server

    services = compose["services"]
    command = services["mlflow"]["command"]
    assert command[:2] == ["mlflow", "server"]
    params = server.make_context("server", command[2:]).params  # the installed mlflow's own parser
    backend = urlparse(params["backend_store_uri"])
    postgres = services["postgres"]["environment"]
    assert backend.scheme in ("postgresql", "postgresql+psycopg2") and backend.hostname == "postgres"
    assert backend.port == 5432
    assert (backend.username, backend.password, backend.path.lstrip("/")) == (
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
        postgres["POSTGRES_DB"],
    )
    # artifacts: proxied by the server into a MinIO bucket that create-buckets makes
    assert params["serve_artifacts"]
    destination = urlparse(params["artifacts_destination"])
    assert destination.scheme == "s3"
    buckets = re.findall(r"mb (?:--ignore-existing )?((?:\S+/\S+ ?)+)", " ".join(services["create-buckets"]["command"]))
    created = {word.split("/", 1)[1] for word in " ".join(buckets).split()}
    assert destination.hostname in created and "dictsweep" in created
    endpoint = urlparse(services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"])
    assert endpoint.hostname == "minio" and f":{endpoint.port}" == option(services["minio"]["command"], "--address")


def test_mlflow_answers_the_host_names_its_clients_use(compose):
    """MLflow 3 refuses requests whose Host header it does not allow: the Ray containers say
    `mlflow:5000`, clients on this machine `127.0.0.1:5000` / `localhost:5000`."""
    from mlflow.server.security_utils import is_allowed_host_header

    services = compose["services"]
    allowed = option(services["mlflow"]["command"], "--allowed-hosts").split(",")
    port = int(option(services["mlflow"]["command"], "--port"))
    host_port = published(services["mlflow"])[port]
    tracking = urlparse(services["ray-head"]["environment"]["MLFLOW_TRACKING_URI"]).netloc
    for host in (tracking, f"127.0.0.1:{host_port}", f"localhost:{host_port}"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "evil.example:5000")


def test_ray_cluster_wiring(compose):
    services = compose["services"]
    head = ray_start(services["ray-head"]).params
    worker = ray_start(services["ray-worker"]).params
    assert head["head"] and head["block"] and worker["block"]
    assert head["num_cpus"] == 0  # trainers and readers on the worker
    assert worker["address"] == f"ray-head:{head['port']}"
    for name in RAY_SERVICES:
        assert services[name]["environment"]["RAY_ADDRESS"] == worker["address"]
    assert head["dashboard_host"] == "0.0.0.0" and 8265 in published(services["ray-head"])  # Jobs API
    store = worker["object_store_memory"]
    assert store and store < size_bytes(services["ray-worker"]["shm_size"]), "object store must fit /dev/shm"


def test_published_ports_are_local_and_distinct(compose):
    seen = {}
    for name, service in compose["services"].items():
        for entry in service.get("ports", []):
            assert str(entry).startswith("127.0.0.1:"), f"{name}: {entry} would listen on every interface"
            host = int(str(entry).split(":")[1])
            assert host not in seen, f"{name} and {seen.get(host)} both publish {host}"
            seen[host] = name


def test_gpu_override_reserves_gpus_for_the_worker(compose, compose_gpu):
    override = compose_gpu
    assert set(override["services"]) <= set(compose["services"])
    devices = override["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_env_example_names_the_variables_compose_uses():
    text = (COMPOSE_DIR / "compose.yaml").read_text()
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))
    example = {
        line.lstrip("# ").split("=", 1)[0]
        for line in (COMPOSE_DIR / ".env.example").read_text().splitlines()
        if re.match(r"#? ?[A-Z][A-Z0-9_]*=", line)
    }
    assert used == example, f"compose uses {sorted(used)}, .env.example documents {sorted(example)}"
