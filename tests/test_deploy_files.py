"""The deploy/ files parse and point at the real entry point."""

from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_rayjob_manifest_parses() -> None:
    doc = yaml.safe_load((DEPLOY / "kuberay-rayjob.yaml").read_text())
    assert doc["kind"] == "RayJob"
    assert doc["spec"]["entrypoint"].startswith("python -m scalespd.run ")
    groups = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert any("nvidia.com/gpu" in c["resources"]["limits"]
               for g in groups for c in g["template"]["spec"]["containers"])


def test_local_script_submits_the_cli() -> None:
    text = (DEPLOY / "local.sh").read_text()
    assert "ray job submit" in text and "python -m scalespd.run" in text
    assert "RAY_AUTH_MODE=disabled" in text
