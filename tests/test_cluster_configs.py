"""Cluster files checked against what consumes them, with no cluster, Docker or model: the image
(cluster/Dockerfile, .dockerignore), the KubeRay RayService, the cluster launcher files, every Serve
config (against Ray's schemas and by building each application as `serve deploy` would), and the
commands of cluster/README.md against the names, ports and paths in those files."""

import fnmatch
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from ray._common.utils import import_attr
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve._private.build_app import build_app
from ray.serve.schema import ServeDeploySchema

from chatterbox.__main__ import main as chatterbox_cli
from serve_app.config import AppArgs
from serve_app.jobs.config import CONSUMER_DEPLOYMENT

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
README = (CLUSTER / "README.md").read_text()
RAYSERVICE_PATH = CLUSTER / "rayservice.yaml"
LAUNCHERS = sorted(CLUSTER.glob("launcher-*.yaml"))
SERVE_CONFIGS = [ROOT / "serve_config.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]
YAML_FILES = [*SERVE_CONFIGS, *sorted(CLUSTER.glob("*.yaml"))]
# Our image's tag names the Ray inside it (tests below tie it to the required version).
IMAGE_TAG = f"chatterbox-serve:ray{ray.__version__}"
# What the operator adds to a RayService's name for its Services.
SERVE_SVC_SUFFIX, HEAD_SVC_SUFFIX = "-serve-svc", "-head-svc"


def load_rayservice() -> tuple[dict, dict]:
    """The PersistentVolumeClaim and the RayService of cluster/rayservice.yaml."""
    documents = {doc["kind"]: doc for doc in yaml.safe_load_all(RAYSERVICE_PATH.read_text()) if doc}
    assert set(documents) == {"PersistentVolumeClaim", "RayService"}
    return documents["PersistentVolumeClaim"], documents["RayService"]


def embedded_serve_config() -> dict:
    return yaml.safe_load(load_rayservice()[1]["spec"]["serveConfigV2"])


def app_args(config: dict) -> AppArgs:
    return AppArgs.model_validate(config["applications"][0]["args"])


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of cluster/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (CLUSTER / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(maxsplit=1)[0].upper(), line.split(maxsplit=1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def commands_in(text: str, program: str) -> list[list[str]]:
    """Every command line in ``text`` (fenced or in comments) that runs ``program``, as argv."""
    joined = re.sub(r"\\\n\s*(#\s*)?", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.strip().lstrip("#").strip().split("  #")[0]
        if line.startswith(f"{program} ") or re.match(rf"^[A-Z_]+=\S+ {program} ", line):
            argv = shlex.split(line)
            found.append(argv[argv.index(program) :])
    return found


def dockerignored(name: str) -> bool:
    """Whether a top-level path of the build context is left out by .dockerignore (last match wins)."""
    ignored = False
    for pattern in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#") or "/" in pattern:
            continue
        if fnmatch.fnmatchcase(name, pattern.lstrip("!")):
            ignored = not pattern.startswith("!")
    return ignored


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_yaml_parses(path):
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert documents
    assert all(isinstance(doc, dict) for doc in documents)


def test_images_and_cluster_hold_the_required_ray():
    # Python 3.10 has no tomllib: the requirement is the one quoted string that starts with ray[.
    required = Requirement(re.search(r'"(ray\[[^"]+)"', (ROOT / "pyproject.toml").read_text())[1])
    assert required.name == "ray"
    assert required.specifier.contains(ray.__version__)  # the Ray these tests validate against
    base = next(args for op, args in dockerfile_instructions() if op == "FROM")
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py3\d+-gpu", base)
    _, service = load_rayservice()
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    images = [
        container["image"]
        for group in [
            service["spec"]["rayClusterConfig"]["headGroupSpec"],
            *service["spec"]["rayClusterConfig"]["workerGroupSpecs"],
        ]
        for container in group["template"]["spec"]["containers"]
    ]
    images += [yaml.safe_load(path.read_text())["docker"]["image"] for path in LAUNCHERS]
    assert images
    assert all(image.endswith(f"/{IMAGE_TAG}") for image in images), images


def test_dockerfile_installs_the_package_and_bakes_the_weights_without_the_token():
    instructions = dockerfile_instructions()
    copied = [
        source
        for op, args in instructions
        if op == "COPY"
        for source in [word for word in shlex.split(args) if not word.startswith("--")][:-1]
    ]
    assert {"pyproject.toml", "README.md", "chatterbox", "serve_app"} <= set(copied)
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not dockerignored(source), f".dockerignore leaves out {source}, which the image copies"
    for heavy in (".venv", ".venv-ref", ".git", "checkpoints", "tests"):
        assert dockerignored(heavy), heavy

    runs = [args for op, args in instructions if op == "RUN"]
    assert any(re.fullmatch(r"pip install --no-cache-dir \S+", run) for run in runs)
    download = next(i for i, (op, args) in enumerate(instructions) if "python -m chatterbox download" in args)
    # The token only as a BuildKit secret of that one step: never an ARG or ENV, so never in a layer.
    assert instructions[download][1].startswith("--mount=type=secret,id=hf_token,env=HF_TOKEN ")
    assert not [args for op, args in instructions if op in ("ARG", "ENV") and "TOKEN" in args]
    offline = instructions.index(("ENV", "HF_HUB_OFFLINE=1"))
    assert offline > download  # replicas start offline, after the weights are in the image
    with pytest.raises(SystemExit) as exited:  # the download command the image runs exists
        chatterbox_cli(["download", "--help"])
    assert exited.value.code == 0


@pytest.mark.parametrize(
    "path", [*SERVE_CONFIGS, RAYSERVICE_PATH], ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_serve_config_imports_and_builds(path):
    config = embedded_serve_config() if path == RAYSERVICE_PATH else yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(config)
    for app in schema.applications:
        # The calls Serve's build task makes for `serve deploy` (application_state.py).
        application = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args)
        built = build_app(application, name=app.name)
        names = {deployment.name for deployment in built.deployments}
        args = AppArgs.model_validate(app.args or {})
        consumer = {CONSUMER_DEPLOYMENT} if args.jobs.enabled else set()
        assert names == {"Ingress", "TurboModel", "Stitcher", *consumer}
        assert built.ingress_deployment_name == "Ingress"
        # Serve refuses overrides for deployments the application does not have.
        assert {override.name for override in app.deployments} <= names
        if args.device == "cuda":  # a GPU share even where no GPU is visible at build time
            model = next(d for d in built.deployments if d.name == "TurboModel")
            assert model.ray_actor_options["num_gpus"] == args.num_gpus


def test_rayservice_serves_the_24gb_profile_with_autoscaling():
    profile = yaml.safe_load((ROOT / "configs" / "gpu-24gb.yaml").read_text())
    embedded = embedded_serve_config()
    assert embedded["http_options"] == profile["http_options"]
    scaling_fields = {"autoscaling", "ingress", "stitcher", "voices"}  # the documented differences
    profile_args, embedded_args = app_args(profile), app_args(embedded)
    assert embedded_args.model_dump(exclude=scaling_fields) == profile_args.model_dump(exclude=scaling_fields)
    assert embedded_args.autoscaling.min_replicas == profile_args.autoscaling.max_replicas  # one GPU's worth
    assert embedded_args.autoscaling.max_replicas > embedded_args.autoscaling.min_replicas


def test_rayservice_cluster_fits_its_serve_config():
    claim, service = load_rayservice()
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    spec = service["spec"]
    assert spec["upgradeStrategy"]["type"] in ("NewCluster", "NewClusterWithIncrementalUpgrade")
    args = app_args(embedded_serve_config())
    assert args.device == "cuda"
    cluster = spec["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"

    groups = {group["groupName"]: group for group in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for group in groups.values():
        assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        # Saved voices: every replica's pod mounts the store (a model replica reads it too).
        mounts = {mount["mountPath"] for mount in group["template"]["spec"]["containers"][0]["volumeMounts"]}
        assert args.voices.store_dir in mounts
    pod = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus_per_pod = int(pod["nvidia.com/gpu"])
    replicas_per_pod = round(gpus_per_pod / args.num_gpus)
    assert int(pod["cpu"]) >= replicas_per_pod * args.model_num_cpus  # CPUs never strand a GPU
    # The minimum replicas fit the minimum pods; the maximum fills the maximum pods exactly.
    assert args.autoscaling.min_replicas <= replicas_per_pod * groups["gpu"]["minReplicas"]
    assert args.autoscaling.max_replicas == replicas_per_pod * groups["gpu"]["maxReplicas"]
    cpu_pod = groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    front_cpus = sum(d.num_replicas * d.num_cpus for d in (args.ingress, args.stitcher))
    assert front_cpus <= int(cpu_pod["cpu"]) * groups["cpu"]["minReplicas"]

    http_port = embedded_serve_config()["http_options"]["port"]
    for group in groups.values():
        pod_spec = group["template"]["spec"]
        container = pod_spec["containers"][0]
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": http_port}
        volumes = {v["name"]: v for v in pod_spec["volumes"]}
        for mount in container["volumeMounts"]:
            assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # mounted by every worker pod


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_matches_ray_schema_and_fits_the_24gb_profile(path):
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, schema)
    node_types = config["available_node_types"]
    assert node_types[config["head_node_type"]]["resources"]["CPU"] == 0  # no replica on the head
    assert any("--num-cpus=0" in command for command in config["head_start_ray_commands"])
    gpu_types = [t for t in node_types.values() if t["resources"].get("GPU", 0) >= 1]
    assert len(gpu_types) == 1
    gpu_node = gpu_types[0]
    assert 1 <= gpu_node["min_workers"] <= gpu_node["max_workers"] <= config["max_workers"]
    # One GPU node holds the whole application of the profile its header deploys.
    assert "serve deploy configs/gpu-24gb.yaml" in path.read_text()
    args = app_args(yaml.safe_load((ROOT / "configs" / "gpu-24gb.yaml").read_text()))
    replicas = args.autoscaling.max_replicas
    assert replicas * args.num_gpus <= gpu_node["resources"]["GPU"]
    cpus = replicas * args.model_num_cpus + sum(
        d.num_replicas * d.num_cpus for d in (args.ingress, args.stitcher)
    )
    assert cpus <= gpu_node["resources"]["CPU"]


def test_readme_commands_name_existing_files_and_the_manifest_names():
    root_readme = (ROOT / "README.md").read_text()
    for text in (README, root_readme):
        for path in re.findall(r"\b((?:cluster|configs)/[\w./-]*\w|serve_config\.yaml)", text):
            assert (ROOT / path).exists(), path
    for launcher in LAUNCHERS:
        assert f"ray up cluster/{launcher.name}" in README or f"cluster/{launcher.name}`" in README

    # The image: the README builds the tag the manifests run, with the Dockerfile's secret id.
    builds = commands_in(README, "docker")
    assert [argv for argv in builds if argv[1] == "build"]
    for argv in builds:
        if argv[1] == "build":
            assert argv[argv.index("-f") + 1] == "cluster/Dockerfile"
            assert argv[argv.index("-t") + 1] == f"REGISTRY/{IMAGE_TAG}"
            assert argv[-1] == "."
            if "--secret" in argv:
                assert argv[argv.index("--secret") + 1].startswith("id=hf_token,")
    dockerfile_builds = commands_in((CLUSTER / "Dockerfile").read_text(), "docker")
    assert dockerfile_builds
    assert all(argv in builds for argv in dockerfile_builds)

    # KubeRay: the file, the Services the operator names after the RayService, their ports.
    _, service = load_rayservice()
    name = service["metadata"]["name"]
    http_port = embedded_serve_config()["http_options"]["port"]
    head_ports = {
        p["name"]: p["containerPort"]
        for p in service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0][
            "ports"
        ]
    }
    kubectl = commands_in(README, "kubectl")
    assert ["kubectl", "apply", "-f", "cluster/rayservice.yaml"] in kubectl
    assert ["kubectl", "get", "rayservice", name] in kubectl
    forwards = {argv[2]: argv[3] for argv in kubectl if argv[1] == "port-forward"}
    assert forwards == {
        f"svc/{name}{SERVE_SVC_SUFFIX}": f"{http_port}:{http_port}",
        f"svc/{name}{HEAD_SVC_SUFFIX}": f"{head_ports['dashboard']}:{head_ports['dashboard']}",
    }

    # Serve CLI: every address is the forwarded dashboard; deployed configs exist.
    serve = commands_in(README, "serve")
    assert {argv[1] for argv in serve} >= {"deploy", "status"}
    for argv in serve:
        assert argv[argv.index("-a") + 1] == f"http://127.0.0.1:{head_ports['dashboard']}"
        if argv[1] == "deploy":
            assert (ROOT / argv[2]).is_file()
    assert "RAY_AUTH_MODE=token" in README
    assert f"http://127.0.0.1:{http_port}/readyz" in README
