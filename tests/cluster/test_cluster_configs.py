"""cluster/: the Ray cluster launcher configs pass the checks `ray up` makes before it touches a cloud, and the
KubeRay manifests carry what a RayCluster / RayJob needs, consistent with the image and the recipes they run.

The launcher configs are checked the way `ray up` checks them (ray's own ``prepare_config`` + ``validate_config``,
which validate against the JSON schema shipped inside the ray package) and against that schema directly; broken
copies must fail, so the check is known to bite. Nothing here reaches a cloud or a Kubernetes API.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.runtime_env import RuntimeEnv

from cap_dist.config import load_recipe

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHERS = ("aws.yaml", "gcp.yaml")
KUBERAY = CLUSTER / "kuberay"
IMAGE_ROOT = "/home/ray/cap-dist"          # where cluster/Dockerfile puts the code and jobs/


def launcher(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / name).read_text())


def ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert path.is_file(), f"ray {ray.__version__} ships no {path}"
    return json.loads(path.read_text())


def validate_like_ray_up(config: dict[str, Any]) -> None:
    """What `ray up` runs on a config before any provider call: merge the provider's defaults, then validate
    (jsonschema against ray-schema.json plus the cross-field checks)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


def is_spot(provider: str, node_config: dict[str, Any]) -> bool:
    if provider == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    scheduling = node_config.get("scheduling", {})
    if isinstance(scheduling, list):              # Ray's own GCP examples write a list of one-key mappings
        scheduling = {k: v for item in scheduling for k, v in item.items()}
    return scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible") is True


# ---------------------------------------------------------------------------------------------------------
# Ray cluster launcher


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_passes_ray_validation(name: str) -> None:
    config = launcher(name)
    jsonschema.validate(config, ray_schema())
    validate_like_ray_up(config)


def _unknown_top_level_key(c: dict[str, Any]) -> None:
    c["idle_timeout_minute"] = 5                     # a typo of idle_timeout_minutes


def _node_type_without_resources(c: dict[str, Any]) -> None:
    next(iter(worker_types(c).values())).pop("resources")


def _max_workers_not_an_integer(c: dict[str, Any]) -> None:
    next(iter(worker_types(c).values()))["max_workers"] = "4"


def _fractional_gpu_resource(c: dict[str, Any]) -> None:
    next(iter(worker_types(c).values()))["resources"]["GPU"] = 0.5


def _unknown_head_node_type(c: dict[str, Any]) -> None:
    c["head_node_type"] = "no_such_type"


def _min_workers_above_global_max(c: dict[str, Any]) -> None:
    next(iter(worker_types(c).values()))["min_workers"] = c["max_workers"] + 1


def _unknown_docker_key(c: dict[str, Any]) -> None:
    c["docker"]["imag"] = c["docker"]["image"]


BREAKAGES = [
    (_unknown_top_level_key, "'idle_timeout_minute' was unexpected"),
    (_node_type_without_resources, "'resources' is a required property"),
    (_max_workers_not_an_integer, "'4' is not of type 'integer'"),
    (_fractional_gpu_resource, "0.5 is not of type 'integer'"),
    (_unknown_head_node_type, "must be one of `available_node_types`"),
    (_min_workers_above_global_max, "smaller than the sum of `min_workers`"),
    (_unknown_docker_key, "'imag' was unexpected"),
]


@pytest.mark.parametrize("name", LAUNCHERS)
@pytest.mark.parametrize("breakage,message", BREAKAGES, ids=[f.__name__.strip("_") for f, _ in BREAKAGES])
def test_broken_launcher_config_fails_validation(name: str, breakage, message: str) -> None:
    """Deliberately broken copies must fail, and for the reason broken in: the check can bite."""
    config = launcher(name)
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(message)):
        validate_like_ray_up(config)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_has_cpu_head_and_spot_gpu_workers(name: str) -> None:
    config = launcher(name)
    provider = config["provider"]["type"]
    assert provider == name.removesuffix(".yaml")
    head = config["available_node_types"][config["head_node_type"]]
    # CPU-only head: no GPUs advertised or attached, not spot, and no CPUs for tasks (actors go to the workers)
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU") == 0
    assert head.get("max_workers", 0) == 0
    node = head["node_config"]
    assert not is_spot(provider, node)
    if provider == "aws":
        assert not re.match(r"^(p\d|g\d)", node["InstanceType"]), node["InstanceType"]
    else:
        assert "guestAccelerators" not in node and not re.match(r"^(a\d|g\d)-", node["machineType"])

    workers = worker_types(config)
    assert len(workers) >= 2
    for type_name, spec in workers.items():
        assert spec["resources"].get("GPU", 0) >= 1, f"{type_name} requests no GPU"
        assert spec["resources"].get("CPU", 0) >= 1
        assert 0 <= spec["min_workers"] <= spec["max_workers"] <= config["max_workers"]
        assert is_spot(provider, spec["node_config"]), f"{type_name} is not a spot/preemptible type"
        if provider == "gcp":
            # GCP does not detect a machine type's resources: memory must be declared for memory_gb to schedule,
            # and GPU VMs cannot live-migrate.
            assert spec["resources"].get("memory", 0) > 0
            scheduling = spec["node_config"]["scheduling"]
            assert scheduling["onHostMaintenance"] == "TERMINATE"
        else:
            assert "IamInstanceProfile" in spec["node_config"], "workers need a role to reach S3"
    assert sum(s["min_workers"] for s in workers.values()) <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_runs_the_cap_dist_image_and_no_default_setup(name: str) -> None:
    config = launcher(name)
    docker = config["docker"]
    assert docker["image"] and docker["container_name"]
    assert isinstance(docker.get("run_options", []), list)
    # Without explicit (empty) setup commands `ray up` merges in the provider defaults, which pip-install a
    # nightly Ray wheel over the image's pinned one.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert config[key] == [], key
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--head" in head_start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "$RAY_HEAD_IP" in " ".join(config["worker_start_ray_commands"])


def test_every_cluster_config_uses_one_image() -> None:
    images = {launcher(n)["docker"]["image"] for n in LAUNCHERS}
    for doc in kuberay_docs():
        images |= {c["image"] for spec in pod_templates(doc) for c in spec["containers"]}
    assert len(images) == 1, images


def test_dockerfile_matches_ray_and_pins_torch() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", text, re.M)
    assert base, "the base image is an ARG so it can be swapped"
    assert base.group(1).startswith(f"rayproject/ray:{ray.__version__}-"), base.group(1)
    assert re.search(r"pip install -c constraints\.txt torch torchvision", text)
    assert "COPY --chown=ray:users jobs ./jobs" in text
    assert re.search(rf"^WORKDIR {re.escape(IMAGE_ROOT)}$", text, re.M)
    constraints = (ROOT / "constraints.txt").read_text()
    assert f"ray=={ray.__version__}" in constraints and re.search(r"^torch==", constraints, re.M)


# ---------------------------------------------------------------------------------------------------------
# KubeRay


def kuberay_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = cluster_spec(doc)
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def quantity(value: str | int) -> float:
    """A Kubernetes quantity in base units (CPU cores, bytes)."""
    text = str(value)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    for suffix, scale in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


def test_kuberay_manifests_parse_with_the_expected_kinds() -> None:
    files = {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in KUBERAY.glob("*.yaml")}
    assert {"raycluster.yaml", "rayjob-prune.yaml", "rayjob-finetune.yaml"} <= set(files)
    kinds = {name: [d["kind"] for d in docs] for name, docs in files.items()}
    assert kinds["raycluster.yaml"] == ["RayCluster"]
    assert kinds["rayjob-prune.yaml"] == ["RayJob"] and kinds["rayjob-finetune.yaml"] == ["RayJob"]
    for docs in files.values():
        for doc in docs:
            assert doc["apiVersion"] == "ray.io/v1"
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


@pytest.mark.parametrize("doc", kuberay_docs(), ids=lambda d: d["metadata"]["name"])
def test_kuberay_cluster_spec_has_cpu_head_and_gpu_workers(doc: dict[str, Any]) -> None:
    spec = cluster_spec(doc)
    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    head_container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {})
    assert head["rayStartParams"].get("num-cpus") == "0"
    assert {p["containerPort"] for p in head_container["ports"]} >= {6379, 8265}
    groups = spec["workerGroupSpecs"]
    assert groups and len({g["groupName"] for g in groups}) == len(groups)
    for group in groups:
        assert 0 <= group["minReplicas"] <= group["maxReplicas"]
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # map[string]string in the CRD
        resources = group["template"]["spec"]["containers"][0]["resources"]
        gpus = int(resources["limits"]["nvidia.com/gpu"])
        assert gpus >= 1
        assert resources["requests"].get("nvidia.com/gpu", resources["limits"]["nvidia.com/gpu"]) == \
            resources["limits"]["nvidia.com/gpu"], "Kubernetes needs GPU requests == limits"
        mounts = {m["mountPath"] for m in group["template"]["spec"]["containers"][0].get("volumeMounts", [])}
        assert "/dev/shm" in mounts, "Ray's object store needs a /dev/shm larger than the 64 MB pod default"


def test_raycluster_enables_the_autoscaler() -> None:
    (doc,) = [d for d in kuberay_docs() if d["kind"] == "RayCluster"]
    spec = doc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert all(g["minReplicas"] == 0 and g["maxReplicas"] >= 1 for g in spec["workerGroupSpecs"]), \
        "GPU groups scale from zero"


RAYJOBS = [d for d in kuberay_docs() if d["kind"] == "RayJob"]


@pytest.mark.parametrize("doc", RAYJOBS, ids=lambda d: d["metadata"]["name"])
def test_rayjob_runs_a_real_recipe_on_enough_resources(doc: dict[str, Any]) -> None:
    spec = doc["spec"]
    match = re.fullmatch(rf"cap-dist (prune|run) --config {re.escape(IMAGE_ROOT)}/(jobs/[\w.-]+\.yaml)(?: \S+=\S+)*",
                         spec["entrypoint"].strip())
    assert match, spec["entrypoint"]
    command, recipe_path = match.groups()
    assert (ROOT / recipe_path).is_file(), f"{recipe_path} is not in the repository (the image copies jobs/)"
    recipe = load_recipe(str(ROOT / recipe_path))
    assert (recipe.finetune is not None) == (command == "run"), "`run` is for recipes with a finetune section"

    # runtimeEnvYAML: valid for Ray, and the same variables as cluster/runtime_env.yaml
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)
    shared = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert shared["env_vars"].items() <= runtime_env["env_vars"].items()

    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"

    # The worker pods hold what the recipe asks Ray for.
    gpus = cpus = memory = 0.0
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        replicas = group.get("replicas", group["minReplicas"])
        gpus += replicas * int(limits["nvidia.com/gpu"])
        cpus += replicas * quantity(limits["cpu"])
        memory += replicas * quantity(limits["memory"])
    cfg = recipe.distributed
    assert cfg.actors * cfg.num_gpus <= gpus and cfg.actors * cfg.num_cpus <= cpus
    assert cfg.actors * (cfg.memory_gb or 0) * 2**30 <= 0.7 * memory   # Ray keeps ~30 % for its object store
    if recipe.finetune is not None:
        ft = recipe.finetune
        assert ft.use_gpu and ft.workers * ft.gpus_per_worker <= gpus
        assert ft.workers * ft.cpus_per_worker <= cpus


def test_runtime_env_file_is_accepted_by_ray() -> None:
    spec = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**spec)
    assert {".venv/", "runs/", "*.safetensors"} <= set(spec["excludes"])


def test_cluster_readme_covers_the_workflow() -> None:
    text = (CLUSTER / "README.md").read_text()
    for step in ("docker build", "ray up cluster/aws.yaml", "ray up cluster/gcp.yaml", "ray dashboard",
                 "jobs/submit.sh", "ray job submit", "ray job logs", "ray job status", "ray down",
                 "helm install", "kubectl apply -f cluster/kuberay/raycluster.yaml",
                 "kubectl apply -f cluster/kuberay/rayjob-prune.yaml", "storage.endpoint_url"):
        assert step in text, step
