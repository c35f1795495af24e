"""The report stage with its run directory on memory:// and s3:// (a local S3-compatible server
on loopback, tests/object_stores.py): it reads the earlier stages' files there and writes the
same report files, with the same content, as from a local run directory. A toy run (ground
truth, graph, alternative clustering, quality) and a language-model run (tokens, ablation), both
written by hand, no stage run before the report."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
from object_stores import files_under
from report_lmrun import lm_config, write_lm_run
from report_toyrun import LinkCollector, run_config, write_toy_run
from upath import UPath

from scalespd import storage
from scalespd.report.stage import run

# The report's own duration: the one number that differs between two builds.
_REPORT_SECONDS_ROW = re.compile(r"<tr><td>report</td><td>[^<]*</td></tr>")


def _report(files: dict[str, bytes]) -> dict[str, bytes]:
    """The report's files, with report_seconds taken out of summary.json and index.html."""
    out = {k[len("report/"):]: v for k, v in files.items() if k.startswith("report/")}
    summary = json.loads(out["summary.json"])
    assert summary.pop("report_seconds") >= 0
    out["summary.json"] = json.dumps(summary, sort_keys=True).encode()
    page = out["index.html"].decode("utf-8")
    assert len(_REPORT_SECONDS_ROW.findall(page)) == 1
    out["index.html"] = _REPORT_SECONDS_ROW.sub("", page).encode("utf-8")
    return out


@pytest.fixture(scope="module")
def toy_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("toy") / "run"
    write_toy_run(src)
    return src


@pytest.fixture(scope="module")
def lm_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("lm") / "run"
    write_lm_run(src)
    return src


def _local_report(src: Path, tmp_path: Path, cfg) -> tuple[dict[str, bytes], dict]:  # noqa: ANN001
    run_dir = tmp_path / "local"
    shutil.copytree(src, run_dir)
    info = run(cfg, run_dir)
    return _report(files_under(UPath(run_dir))), info


def _store_dir(request: pytest.FixtureRequest, store: str) -> UPath:
    """A fresh memory:// or s3:// folder (the S3 server starts only when a test needs it)."""
    return request.getfixturevalue(f"{store}_dir")


@pytest.mark.parametrize("store", ["memory", "s3"])
def test_toy_report_on_an_fsspec_run_dir(store, request, toy_src, tmp_path, caplog):
    cfg = run_config()
    local, local_info = _local_report(toy_src, tmp_path, cfg)
    run_dir = _store_dir(request, store)
    storage.upload_dir(toy_src, run_dir)
    before = files_under(run_dir)

    with caplog.at_level(logging.INFO, logger="scalespd.report.stage"):
        info = run(cfg, run_dir)
    assert info == local_info
    after = files_under(run_dir)
    # Only report/ was written; the other stages' files are as they were.
    assert {k: v for k, v in after.items() if not k.startswith("report/")} == before
    remote = _report(after)
    assert sorted(remote) == sorted(local)
    assert {"summary.json", "clusters.json", "index.html", "onehot_ci.png",
            "correlation.png", "spectra.png"} <= set(remote)
    for name in local:
        assert remote[name] == local[name], name  # PNGs byte for byte too
    summary = json.loads(remote["summary.json"])
    assert summary["ground_truth"]["mechanisms_total"] == 4
    assert summary["ground_truth_alternative"]["dense"]["recovered"]
    assert summary["n_edges"] > 0 and summary["quality"]["n_clusters_scored"] == 2

    # Links stay relative and point at files that exist next to index.html.
    links = LinkCollector()
    links.feed(remote["index.html"].decode("utf-8"))
    assert links.links and all("://" not in link and not link.startswith("/")
                               for link in links.links)
    assert all(link in remote for link in links.links)
    # The log names the report by its URL.
    assert f"report written to {run_dir / 'report' / 'index.html'}" in caplog.text
    assert f"{run_dir.protocol}://" in caplog.text


@pytest.mark.parametrize("store", ["memory", "s3"])
def test_lm_report_on_an_fsspec_run_dir(store, request, lm_src, tmp_path):
    cfg = lm_config()
    local, local_info = _local_report(lm_src, tmp_path, cfg)
    run_dir = _store_dir(request, store)
    storage.upload_dir(lm_src, run_dir)
    assert run(cfg, run_dir) == local_info
    remote = _report(files_under(run_dir))
    assert sorted(remote) == sorted(local)
    assert "clusters_lm.json" in remote
    for name in local:
        assert remote[name] == local[name], name
    summary = json.loads(remote["summary.json"])
    assert summary["lm"]["tokens_decoded"] and summary["lm"]["ablation"]["n_tested"] == 2


def test_missing_input_is_named_by_url(memory_dir, lm_src):
    from scalespd.report.inputs import ReportInputError  # noqa: PLC0415

    storage.upload_dir(lm_src, memory_dir)
    (memory_dir / "spectral" / "clusters.csv").unlink()
    with pytest.raises(ReportInputError, match=re.escape(
            f"{memory_dir / 'spectral' / 'clusters.csv'} is missing")):
        run(lm_config(), memory_dir)
