"""The config schema: defaults, YAML round trip, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from scalespd.config import ConfigError, RunConfig, config_to_yaml, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]


def test_default_is_valid_and_round_trips(tmp_path: Path) -> None:
    cfg = RunConfig()
    path = tmp_path / "cfg.yaml"
    path.write_text(config_to_yaml(cfg))
    assert load_config(path) == cfg
    assert load_config(None) == cfg


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"decompose\.stepz: unknown key"):
        parse_config({"decompose": {"stepz": 10}})


def test_wrong_type_is_named() -> None:
    with pytest.raises(ConfigError, match=r"graph\.k"):
        parse_config({"graph": {"k": "ten"}})


def test_nonpositive_C_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"decompose\.modules\.0\.C"):
        parse_config({"decompose": {"modules": [{"pattern": "linear1", "C": 0}]}})


def test_target_kind_discriminates() -> None:
    cfg = parse_config({"target": {"kind": "resid_mlp", "n_layers": 2, "d_mlp": 25}})
    assert cfg.target.kind == "resid_mlp" and cfg.target.n_layers == 2
    with pytest.raises(ConfigError, match=r"target"):
        parse_config({"target": {"kind": "resnet"}})
    # A field of the other target kind is unknown here.
    with pytest.raises(ConfigError, match=r"target\.tms\.d_mlp: unknown key"):
        parse_config({"target": {"kind": "tms", "d_mlp": 3}})


def test_cross_field_checks() -> None:
    with pytest.raises(ConfigError, match="divisible by num_workers"):
        parse_config({"decompose": {"batch_size": 1001, "num_workers": 2}})
    with pytest.raises(ConfigError, match="multiple of chunk_rows"):
        parse_config({"profiles": {"chunk_rows": 1000, "block_rows": 1500}})
    with pytest.raises(ConfigError, match="final_frac must be 1.0"):
        parse_config({"decompose": {"schedule": {"lr": 1e-3, "final_frac": 0.5}}})


def test_configs_are_frozen() -> None:
    cfg = RunConfig()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.graph.k = 3  # type: ignore[misc]


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("decompose: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(top)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path: Path) -> None:
    load_config(path)
