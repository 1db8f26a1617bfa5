"""The Kubernetes manifests against the subset of the KubeRay CRDs they use
(kuberay_crd_subset.yaml), and against what the package reads: env vars from objects that
infra/k8s defines, `ray start` parameters Ray knows, a RayJob whose entrypoint and spec dictsweep
accepts, and a RayJob cluster that is the RayCluster's."""

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from dictsweep.reference import ENVIRONMENT

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ray.scripts imports
SCHEMA = yaml.safe_load((Path(__file__).parent / "kuberay_crd_subset.yaml").read_text())
# what every Ray container needs to reach MLflow and S3 (docs/reference.md, "Environment")
NEEDED_ENV = {
    "MLFLOW_TRACKING_URI",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "RAY_AUTH_MODE",
}


def kind_key(obj: dict) -> str:
    return f"{obj.get('apiVersion')}/{obj.get('kind')}"


def cluster_specs(objects) -> list[tuple[str, dict]]:
    """(name, RayClusterSpec) of every RayCluster and every RayJob's cluster."""
    specs = []
    for _, obj in objects:
        if obj["kind"] == "RayCluster":
            specs.append((obj["metadata"]["name"], obj["spec"]))
        elif obj["kind"] == "RayJob":
            specs.append((obj["metadata"]["name"], obj["spec"]["rayClusterSpec"]))
    return specs


def groups(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [
        (group["groupName"], group) for group in spec.get("workerGroupSpecs", [])
    ]


def quantity_bytes(text) -> float:
    units = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text)).groups()
    return float(number) * units[unit]


def test_manifests_exist(k8s_objects):
    kinds = {obj["kind"] for _, obj in k8s_objects}
    assert {"RayCluster", "RayJob", "ConfigMap", "Secret"} <= kinds


def test_every_object_matches_the_crd_subset(k8s_objects):
    for path, obj in k8s_objects:
        schema = SCHEMA["kinds"].get(kind_key(obj))
        assert schema is not None, f"{path.name}: {kind_key(obj)} is not a kind infra/k8s may hold"
        try:
            jsonschema.Draft202012Validator({**schema, "$defs": SCHEMA["$defs"]}).validate(obj)
        except jsonschema.ValidationError as error:
            where = ".".join(map(str, error.absolute_path))
            pytest.fail(f"{path.name} {obj['kind']} {obj['metadata'].get('name')}: {where}: {error.message}")


def test_the_schema_rejects_what_kuberay_would():
    """Unknown keys, missing required ones and unquoted rayStartParams fail the subset schema."""
    validator = jsonschema.Draft202012Validator({**SCHEMA["kinds"]["ray.io/v1/RayCluster"], "$defs": SCHEMA["$defs"]})
    container = {"name": "ray-head", "image": "x"}
    good = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "c"},
        "spec": {"headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": [container]}}}},
    }
    validator.validate(good)
    typo = copy.deepcopy(good)
    typo["spec"]["workerGroupSpecs"] = [
        {
            "groupName": "g",
            "minReplicas": 0,
            "maxReplicas": 1,
            "rayStartParams": {},
            "template": good["spec"]["headGroupSpec"]["template"],
            "replica": 1,
        }
    ]
    unquoted = copy.deepcopy(good)
    unquoted["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    headless = copy.deepcopy(good)
    del headless["spec"]["headGroupSpec"]
    for bad in (typo, unquoted, headless):
        assert not validator.is_valid(bad)


def test_env_comes_from_objects_defined_here(k8s_objects):
    defined = {
        (obj["kind"], obj["metadata"]["name"]): {**(obj.get("data") or {}), **(obj.get("stringData") or {})}
        for _, obj in k8s_objects
        if obj["kind"] in ("ConfigMap", "Secret")
    }
    for name, spec in cluster_specs(k8s_objects):
        for group_name, group in groups(spec):
            for container in group["template"]["spec"]["containers"]:
                env = {item["name"]: item for item in container.get("env", [])}
                where = f"{name}/{group_name}/{container['name']}"
                assert set(env) <= set(ENVIRONMENT), f"{where}: {set(env) - set(ENVIRONMENT)} are not read by dictsweep"
                assert NEEDED_ENV <= set(env), f"{where}: missing {NEEDED_ENV - set(env)}"
                for variable, item in env.items():
                    for ref_kind, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                        ref = item.get("valueFrom", {}).get(ref_kind)
                        if ref is None:
                            continue
                        assert (kind, ref["name"]) in defined, (
                            f"{where}: {variable} names {kind} {ref['name']}, not in infra/k8s"
                        )
                        if not ref.get("optional"):
                            assert ref["key"] in defined[(kind, ref["name"])], (
                                f"{where}: {variable}: no key {ref['key']}"
                            )


def test_configmaps_hold_only_known_variables(k8s_objects):
    for _, obj in k8s_objects:
        if obj["kind"] in ("ConfigMap", "Secret") and obj["metadata"]["name"] in ("dictsweep-env", "dictsweep-s3"):
            keys = set(obj.get("data") or {}) | set(obj.get("stringData") or {})
            assert keys <= set(ENVIRONMENT), f"{obj['metadata']['name']}: {keys - set(ENVIRONMENT)}"


def test_ray_start_params_are_ray_start_options(k8s_objects):
    from ray.scripts.scripts import start

    for name, spec in cluster_specs(k8s_objects):
        for group_name, group in groups(spec):
            args = [f"--{key}={value}" for key, value in group["rayStartParams"].items()]
            context = start.make_context("start", args)  # an unknown option or a bad value raises
            assert context.params["block"] is False  # KubeRay adds --block itself
            if group_name != "head":
                assert context.params["object_store_memory"], f"{name}/{group_name}: size the object store"


def test_ray_containers_and_resources(k8s_objects, version):
    for name, spec in cluster_specs(k8s_objects):
        for group_name, group in groups(spec):
            pod = group["template"]["spec"]
            container = pod["containers"][0]  # KubeRay runs Ray in the first container
            where = f"{name}/{group_name}"
            assert re.fullmatch(rf"[\w.\-/:]*/dictsweep:{re.escape(version)}", container["image"]), where
            shm = [mount for mount in container["volumeMounts"] if mount["mountPath"] == "/dev/shm"]
            assert shm, f"{where}: Ray's object store needs a memory-backed /dev/shm"
            volume = next(v for v in pod["volumes"] if v["name"] == shm[0]["name"])
            assert volume["emptyDir"]["medium"] == "Memory"
            store = int(group["rayStartParams"].get("object-store-memory", 0))
            assert store < quantity_bytes(volume["emptyDir"]["sizeLimit"]), f"{where}: object store over /dev/shm"
            assert store < quantity_bytes(container["resources"]["limits"]["memory"]), where
            limits, requests = container["resources"]["limits"], container["resources"]["requests"]
            if group_name == "head":
                assert group["rayStartParams"]["num-cpus"] == "0", "trainers and readers stay off the head"
                ports = {port["containerPort"] for port in container["ports"]}
                assert {6379, 8265} <= ports, f"{where}: GCS and dashboard / Jobs API ports"
            else:
                assert int(limits["nvidia.com/gpu"]) >= 1 and limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"]
                assert group["rayStartParams"].get("num-gpus", limits["nvidia.com/gpu"]) == str(
                    limits["nvidia.com/gpu"]
                )
                # the sweep plans on the GPUs present at its start: a fixed-size group
                assert group["minReplicas"] == group["replicas"] == group["maxReplicas"] > 0, where


def test_rayjob_runs_a_valid_spec_mounted_from_a_configmap(k8s_objects, tmp_path):
    import typer.main

    from dictsweep.cli import app
    from dictsweep.spec_file import load_spec

    configmaps = {obj["metadata"]["name"]: obj["data"] for _, obj in k8s_objects if obj["kind"] == "ConfigMap"}
    jobs = [obj for _, obj in k8s_objects if obj["kind"] == "RayJob"]
    assert jobs
    for job in jobs:
        words = shlex.split(job["spec"]["entrypoint"])
        assert words[:2] == ["dictsweep", "run"], "the entrypoint runs a sweep"
        command = typer.main.get_command(app).get_command(None, "run")
        params = command.make_context("run", words[2:]).params  # dictsweep's own argument parsing
        spec_path = Path(params["spec_path"])
        head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]  # the driver runs on the head
        mount = next(m for m in head["containers"][0]["volumeMounts"] if spec_path.parent == Path(m["mountPath"]))
        volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
        item = next(i for i in volume["configMap"]["items"] if i["path"] == spec_path.name)
        text = configmaps[volume["configMap"]["name"]][item["key"]]
        (tmp_path / "sweep.yaml").write_text(text)
        spec = load_spec(str(tmp_path / "sweep.yaml"), params["overrides"])
        assert spec.resources.device == "cuda"
        assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_rayjob_cluster_is_the_raycluster(k8s_objects):
    """The two copies of the cluster (RayCluster, RayJob) differ only by the RayJob's spec volume."""
    clusters = [obj["spec"] for _, obj in k8s_objects if obj["kind"] == "RayCluster"]
    jobs = [obj["spec"]["rayClusterSpec"] for _, obj in k8s_objects if obj["kind"] == "RayJob"]
    for job_cluster in jobs:
        stripped = copy.deepcopy(job_cluster)
        head = stripped["headGroupSpec"]["template"]["spec"]
        spec_volumes = {v["name"] for v in head["volumes"] if "configMap" in v}
        head["volumes"] = [v for v in head["volumes"] if v["name"] not in spec_volumes]
        head["containers"][0]["volumeMounts"] = [
            m for m in head["containers"][0]["volumeMounts"] if m["name"] not in spec_volumes
        ]
        assert stripped in clusters, "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml's spec"
