"""The config reference (docs/config.md) and `--show-config` come from the models' field
docstrings; `--set` changes one field from the command line."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import yaml

from scalespd import config as config_mod
from scalespd import run as runmod
from scalespd.config import RunConfig, load_config, read_yaml
from scalespd.configdoc import commented_yaml, reference_markdown

REPO = Path(__file__).resolve().parents[1]


def test_docs_config_md_is_current() -> None:
    committed = (REPO / "docs" / "config.md").read_text()
    assert committed == reference_markdown(), (
        "docs/config.md is out of date: run `python -m scalespd.configdoc > docs/config.md`")


def test_every_field_has_a_meaning() -> None:
    models = [m for m in vars(config_mod).values()
              if inspect.isclass(m) and issubclass(m, config_mod.Cfg) and m is not config_mod.Cfg]
    missing = [f"{m.__name__}.{n}" for m in models for n, f in m.model_fields.items()
               if not (f.description and len(f.description) > 10)]
    assert not missing, missing
    doc = reference_markdown()
    for m in models:
        for name in m.model_fields:
            assert f"| `{name}` |" in doc


def test_show_config_prints_the_resolved_config_with_meanings(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("graph:\n  k: 7\n")
    assert runmod.main([str(cfg), "--set", "spectral.k_max=9", "--show-config"]) == 0
    out = capsys.readouterr().out
    assert "# Candidate neighbours per node: each node's k most correlated columns" in out
    shown = RunConfig.model_validate(read_yaml(out))
    assert shown.graph.k == 7 and shown.spectral.k_max == 9
    assert shown == load_config(cfg, ["spectral.k_max=9"])
    assert not (tmp_path / "runs").exists()


def test_commented_yaml_round_trips_every_shipped_config() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert RunConfig.model_validate(yaml.safe_load(commented_yaml(cfg))) == cfg, path


def test_set_overrides_are_validated_like_the_yaml() -> None:
    cfg = load_config(None, ["graph.k=15", "decompose.modules.0.C=30",
                             "decompose.ci_hidden=[32, 32]", "graph.edge_threshold=0"])
    assert cfg.graph.k == 15 and cfg.decompose.modules[0].C == 30
    assert cfg.decompose.ci_hidden == [32, 32] and cfg.graph.edge_threshold == 0
    for bad, expected in [("graph.kk=1", "graph.kk: unknown key"),
                          ("graph.k=true", "graph.k: Input should be a valid integer"),
                          ("graph.k", "expected section.field=VALUE"),
                          ("graph.k.x=1", "graph.k is a value, not a section"),
                          ("decompose.modules.5.C=1", "not an index of a list of 2")]:
        with pytest.raises(config_mod.ConfigError, match=expected.replace(".", r"\.")):
            load_config(None, [bad])


def test_set_is_recorded_in_the_run_config(tmp_path: Path, fake_stages: list[str]) -> None:
    rc = runmod.main(["--set", "graph.k=5", "--set", "spectral.seed=3",
                      "--run-dir", str(tmp_path / "run")])
    assert rc == 0
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["graph"]["k"] == 5 and recorded["spectral"]["seed"] == 3
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["report"]["status"] == "complete"
