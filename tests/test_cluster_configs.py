"""The cluster definitions in cluster/: the `ray up` file against Ray's own schema,
the KubeRay manifests' shape and Ray version, and their commands against our CLI."""

from __future__ import annotations

import json
import shlex
from importlib import resources

import pytest
import yaml

from antipers.cli import build_parser
from tests.conftest import REPO

CLUSTER = REPO / "cluster"


def test_ray_up_config_matches_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((resources.files("ray.autoscaler") / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]
    setup = " ".join(config["setup_commands"])
    assert "constraints.txt" in setup and "pip install" in setup


def manifests():
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        yield path, yaml.safe_load(path.read_text())


def test_kuberay_manifests_use_this_ray_version_and_gpu_workers():
    import ray

    kinds = set()
    for path, doc in manifests():
        kinds.add(doc["kind"])
        assert doc["apiVersion"] == "ray.io/v1", path
        spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        assert spec["rayVersion"] == ray.__version__, path
        for group in spec["workerGroupSpecs"]:
            container = group["template"]["spec"]["containers"][0]
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "1", path
            names = {e["name"] for e in container["env"]}
            assert {"ANTIPERS_MODELS_DIR", "ANTIPERS_DATA_DIR"} <= names, path
    assert kinds == {"RayCluster", "RayJob"}
    dockerfile = (CLUSTER / "kuberay" / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}" in dockerfile


def test_rayjob_entrypoint_is_a_valid_antipers_run_command():
    doc = dict(manifests())[CLUSTER / "kuberay" / "rayjob.yaml"]
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "antipers"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run" and args.address == "auto"
    assert args.store.startswith("s3://")
    campaign = args.campaign.removeprefix("/antipers/")
    assert (REPO / campaign).is_file()  # the image copies the repository to /antipers


def test_serve_config_matches_serves_schema_and_builds_the_app():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / "serve" / "scoring.yaml").read_text())
    schema = ServeDeploySchema.parse_obj(config)
    (application,) = schema.applications
    assert application.import_path == "antipers.cluster.scoring:app"
    from antipers.cluster.scoring import ScoringService, app

    built = app(application.args)
    assert built is not None and ScoringService.name == application.deployments[0].name


def construct(cls, args):
    """As a Serve replica does: FastAPI ingress makes ``__init__`` a coroutine."""
    import asyncio
    import inspect

    replica = cls.__new__(cls)
    started = cls.__init__(replica, **args)
    if inspect.iscoroutine(started):
        asyncio.run(started)
    return replica


def test_serve_configs_args_construct_the_replica_as_serve_would(tmp_path):
    """``.bind()`` only records the arguments; the replica's constructor is where a
    bad one fails, so construct it here with the shipped config's args."""
    import copy

    from ray.serve.schema import ServeDeploySchema

    from antipers.cluster.client_options import OptionError
    from antipers.cluster.scoring import ScoringService, check_args

    config = yaml.safe_load((REPO / "serve" / "scoring.yaml").read_text())
    args = dict(ServeDeploySchema.parse_obj(config).applications[0].args)
    check_args(args)
    replica = construct(ScoringService.func_or_class, {**args, "store": str(tmp_path / "store")})
    assert replica.limits.max_attack_steps == args["limits"]["max_attack_steps"]
    assert replica.bundle.name == args["base_model"]
    typo = copy.deepcopy(args)
    typo["limits"]["max_image"] = typo["limits"].pop("max_images")
    with pytest.raises(OptionError, match="limits.max_image: unknown"):
        check_args(typo)
    with pytest.raises(OptionError, match="limits.max_image"):
        construct(ScoringService.func_or_class, typo)
