"""The deploy/ files parse, have what their tools require, and point at the real entry point:
the KubeRay RayJob, the Ray cluster-launcher config, the Dockerfile, and the commands of
deploy/README.md (every `python -m scalespd.run` command there parses and its config loads)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from scalespd.config import load_config
from scalespd.run import _parse_args

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
LAUNCHER = DEPLOY / "ray-aws-gpu.yaml"
GPU_INSTANCE = re.compile(r"^(g\d|p\d)[a-z0-9-]*\.")  # AWS GPU families: g4dn, g5, g6, p4d, p5...


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _scalespd_commands(text: str) -> list[list[str]]:
    """Every `python -m scalespd.run ...` command line in the fenced code blocks of a Markdown
    text (shell line continuations joined), as the argument list after `scalespd.run`."""
    code = "\n".join(re.findall(r"^```\w*\n(.*?)^```", text, re.M | re.S))
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in joined.splitlines():
        if "python -m scalespd.run" not in line:
            continue
        tail = line.split("python -m scalespd.run", 1)[1].split("#", 1)[0]
        out.append(shlex.split(tail))
    return out


def _check_command(argv: list[str]) -> None:
    """The command parses with scalespd.run's own parser and its config (a path in the repo,
    or in the image's /workspace) loads with its --set overrides."""
    args = _parse_args(argv)
    config = args.config
    if config is not None:
        config = config.replace("/workspace/", "")
        assert (REPO / config).is_file(), f"{config} (in {argv}) is not a file of the repo"
        config = str(REPO / config)
    load_config(config, args.overrides)


# --------------------------------------------------------------------------------------------
# KubeRay
# --------------------------------------------------------------------------------------------


def test_rayjob_manifest_parses() -> None:
    doc = _load(DEPLOY / "kuberay-rayjob.yaml")
    assert doc["kind"] == "RayJob"
    assert doc["spec"]["entrypoint"].startswith("python -m scalespd.run ")
    groups = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert any("nvidia.com/gpu" in c["resources"]["limits"]
               for g in groups for c in g["template"]["spec"]["containers"])


def test_rayjob_entrypoint_config_and_shared_storage() -> None:
    doc = _load(DEPLOY / "kuberay-rayjob.yaml")
    argv = shlex.split(doc["spec"]["entrypoint"])[3:]
    _check_command(argv)
    run_dir = _parse_args(argv).run_dir
    assert run_dir is not None and str(run_dir).startswith("/shared/")
    cluster = doc["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"],
            *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            # Every pod sees the run directory, and Ray's object store gets a RAM-backed /dev/shm.
            assert "persistentVolumeClaim" in volumes[mounts["/shared"]]
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


# --------------------------------------------------------------------------------------------
# Ray cluster launcher
# --------------------------------------------------------------------------------------------


def test_cluster_launcher_config_has_a_gpu_worker_and_the_image() -> None:
    doc = _load(LAUNCHER)
    assert doc["cluster_name"]
    assert doc["provider"]["type"] == "aws" and doc["provider"]["region"]
    types = doc["available_node_types"]
    head = doc["head_node_type"]
    assert head in types
    workers = {name: t for name, t in types.items() if name != head}
    gpu = [name for name, t in workers.items()
           if GPU_INSTANCE.match(t["node_config"]["InstanceType"])
           or t.get("resources", {}).get("GPU", 0) > 0]
    assert gpu, f"no GPU worker type among {sorted(workers)}"
    assert all(workers[n]["max_workers"] >= 1 for n in gpu)
    assert not GPU_INSTANCE.match(types[head]["node_config"]["InstanceType"]), "CPU head"
    assert types[head]["resources"].get("CPU") == 0  # no work on the head
    docker = doc["docker"]
    assert docker["image"].rsplit("/", 1)[-1].startswith("scalespd")
    # Ray sizes the container's /dev/shm and adds the NVIDIA runtime unless told not to.
    assert docker.get("disable_shm_size_detection", False) is False
    assert docker.get("disable_automatic_runtime_detection", False) is False
    # The run directories are on S3, which every node reaches itself: no shared mount.
    assert not any("/shared" in o for o in docker["run_options"])
    assert any("ray start --head" in c for c in doc["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c
               for c in doc["worker_start_ray_commands"])


def test_cluster_launcher_config_passes_rays_own_validation() -> None:
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:  # a private Ray API: skip rather than fail when it moves
        pytest.skip("ray.autoscaler._private.util is not importable")
    # prepare_config fills the provider's defaults, as `ray up` does before validating.
    validate_config(prepare_config(_load(LAUNCHER)))


# --------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, comments dropped, continuations joined."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip())
            for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)]


def test_dockerfile_installs_the_gpu_extra_on_a_cuda_runtime() -> None:
    steps = _instructions(DEPLOY / "Dockerfile")
    args = dict(a.split("=", 1) for i, a in steps if i == "ARG" and "=" in a)
    base = next(a for i, a in steps if i == "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", base), base
    runs = " ".join(a for i, a in steps if i == "RUN")
    assert "python3.11" in runs
    pip = next(a for i, a in steps if i == "RUN" and "pip install" in a and ".[gpu," in a)
    assert "s3" in re.search(r"\.\[([\w,]+)\]", pip).group(1).split(","), pip  # s3:// runs
    assert '"torch==2.13.0"' in pip or "torch==2.13.0" in pip.split()
    assert "-c constraints-cpu.txt" in pip
    text = (DEPLOY / "Dockerfile").read_text()
    assert "/dev/shm" in text and "--shm-size" in text
    # What the image copies exists and is not excluded by the build-context ignore file.
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for src in (s for i, a in steps if i == "COPY" for s in a.split()[:-1]):
        assert (REPO / src).exists(), src
        assert f"!{src}" in ignore, f"{src} is excluded from the build context"


# --------------------------------------------------------------------------------------------
# README and scripts
# --------------------------------------------------------------------------------------------


def test_local_script_submits_the_cli() -> None:
    text = (DEPLOY / "local.sh").read_text()
    assert "ray job submit" in text and "python -m scalespd.run" in text
    assert "RAY_AUTH_MODE=disabled" in text


def test_readme_gives_every_step_with_the_real_entry_point() -> None:
    text = (DEPLOY / "README.md").read_text()
    steps = ["docker build -f deploy/Dockerfile", "docker push",
             "ray up -y deploy/ray-aws-gpu.yaml", "ray dashboard deploy/ray-aws-gpu.yaml",
             "ray job submit", "--working-dir . --", "ray job logs -f",
             "aws s3 sync s3://", "ray down -y deploy/ray-aws-gpu.yaml",
             "kubectl apply -f deploy/kuberay-rayjob.yaml"]
    for step in steps:
        assert step in text, step
    commands = _scalespd_commands(text)
    assert len(commands) >= 2
    for argv in commands:
        _check_command(argv)
    # Every deploy/ file is described, and every deploy/ path the README names exists.
    for f in DEPLOY.iterdir():
        if f.name == "README.md" or f.name.startswith("."):
            continue
        assert f"`{f.name}`" in text, f"{f.name} is not described in deploy/README.md"
    for name in set(re.findall(r"deploy/[\w.-]+", text)):
        assert (REPO / name).exists(), name


def test_readme_submits_with_an_s3_run_directory() -> None:
    """The cluster walk-through keeps its run directory in S3 (what the launcher config
    provides), and says how to fetch the report from there."""
    text = (DEPLOY / "README.md").read_text()
    run_dirs = [str(_parse_args(argv).run_dir) for argv in _scalespd_commands(text)]
    assert any(d.startswith("s3://") for d in run_dirs), run_dirs
    assert "aws s3 sync s3://" in text
