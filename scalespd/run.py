"""`python -m scalespd.run [cfg.yaml] [--set A.B=V] [--run-dir DIR] [--stages ...] [--force ...]`

`--show-config` prints the resolved config with each field's meaning and exits.

Runs the pipeline target -> decompose -> profiles -> graph -> spectral -> evaluate -> report
on one node
(Ray in-process) or, under `ray job submit`, on the job's Ray cluster. Each stage reads the
previous stage's outputs from the run directory; a stage recorded as complete in
`manifest.json` is skipped on re-run, and `--force STAGE` redoes it (and every stage after it,
since their inputs change). An interrupted stage resumes from what it had written (the decompose
stage from its newest valid checkpoint, the profiles stage from its completion record).

The run directory is scalespd's only if it holds scalespd's `manifest.json` (or is new or
empty); anything else is refused. The manifest records, per stage, its status (`running`,
`complete`, `failed` with the error, `interrupted`), the hash of the config sections it depends
on, the top-level entries it wrote (`files`) and the entries that were already in its folder
and are not scalespd's (`foreign`). Only recorded outputs are ever removed. Every decision
about what is stale, what to redo and what to remove is taken before any work starts.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import json
import logging
import platform
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from upath import UPath

from scalespd.config import RunConfig, config_to_yaml, load_config
from scalespd.errors import (
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    INTERRUPTED_MESSAGE,
    ConfigError,
    RunDirError,
    UserError,
    storage_error,
)
from scalespd.jsonio import write_json_atomic, write_text_atomic
from scalespd.storage import PathLike, as_path, remove, url

log = logging.getLogger("scalespd")

STAGES: tuple[str, ...] = ("target", "decompose", "profiles", "graph", "spectral", "evaluate",
                           "report")
# Each stage module exposes `run(cfg: RunConfig, run_dir: UPath) -> dict` returning a small
# JSON-able summary for the manifest, and writes under run_dir/<stage>.
STAGE_MODULES: dict[str, str] = {
    "target": "scalespd.targets.stage",
    "decompose": "scalespd.train.stage",
    "profiles": "scalespd.profiles.stage",
    "graph": "scalespd.graph.stage",
    "spectral": "scalespd.spectral.stage",
    "evaluate": "scalespd.evaluate.stage",
    "report": "scalespd.report.stage",
}
# Which config sections each stage depends on (a change there makes its output stale). Each
# stage depends on the sections of every stage before it: its inputs are their outputs.
_OWN_SECTIONS = ("target", "decompose", "profiles", "graph", "spectral", "evaluate", "report")
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    s: _OWN_SECTIONS[: i + 1] for i, s in enumerate(STAGES)
}

MANIFEST = "manifest.json"
CONFIG_SNAPSHOT = "config.yaml"
PREVIOUS_CONFIG = "config.previous.yaml"
# Written into every manifest: what makes a directory scalespd's run directory.
MANIFEST_FORMAT = "scalespd-run"


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


def section_hash(cfg: RunConfig, sections: tuple[str, ...]) -> str:
    payload = json.dumps({s: getattr(cfg, s).model_dump(mode="json") for s in sections},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    # Read from the installed distributions' metadata: importing transformers just to print its
    # version would cost seconds on every run.
    for name, dist in (("scalespd", "scalespd"), ("torch", "torch"), ("ray", "ray"),
                       ("numpy", "numpy"), ("scipy", "scipy"), ("zarr", "zarr"),
                       ("sklearn", "scikit-learn"), ("transformers", "transformers")):
        try:
            out[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:  # best-effort metadata
            pass
    return out


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _entries(folder: UPath) -> set[str]:
    """Names of the entries directly inside `folder` (empty if it does not exist)."""
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


@dataclass
class Manifest:
    path: UPath
    data: dict[str, Any] = field(default_factory=lambda: {"stages": {}})

    @classmethod
    def load(cls, run_dir: UPath) -> Manifest | None:
        """The run directory's manifest; None if it has none. A manifest that is not valid
        JSON, or not scalespd's, is an error: it is never overwritten."""
        path = run_dir / MANIFEST
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RunDirError(f"{path} is not valid JSON ({err}); refusing to touch the run "
                              "directory (restore the file or choose another --run-dir)") from None
        # Manifests written before the format field existed are recognised by their layout.
        ours = isinstance(data, dict) and isinstance(data.get("stages"), dict) and (
            data.get("format", MANIFEST_FORMAT) == MANIFEST_FORMAT)
        if not ours:
            raise RunDirError(f"{path} is not a scalespd manifest; refusing to use "
                              f"{run_dir} (choose another --run-dir)")
        return cls(path, data)

    def save(self) -> None:
        write_json_atomic(self.path, self.data)  # atomic: a crash never leaves half a manifest

    def record(self, stage: str) -> dict[str, Any] | None:
        return self.data["stages"].get(stage)

    def is_complete(self, stage: str, cfg: RunConfig) -> bool:
        rec = self.record(stage)
        return bool(rec and rec.get("status") == "complete"
                    and rec.get("config_hash") == section_hash(cfg, STAGE_SECTIONS[stage]))

    def mark(self, stage: str, cfg: RunConfig, status: str, **extra: Any) -> None:
        """Set a stage's status, keeping what its record already holds (e.g. `foreign`)."""
        rec = dict(self.record(stage) or {})
        for stale in ("error", "seconds", "info"):
            rec.pop(stale, None)
        rec.update(status=status, config_hash=section_hash(cfg, STAGE_SECTIONS[stage]),
                   updated_at=_now(), **extra)
        self.data["stages"][stage] = rec
        self.save()

    def ours(self, stage: str, folder: UPath) -> set[str]:
        """Entries of a stage folder that scalespd wrote: the recorded `files` of a complete
        stage; for an unfinished one, everything except what was there before it started."""
        rec = self.record(stage)
        if rec is None:
            return set()
        present = _entries(folder)
        if rec.get("status") == "complete" and "files" in rec:
            return present & set(rec["files"])
        return present - set(rec.get("foreign", []))


# --------------------------------------------------------------------------------------------
# Pre-flight validation
# --------------------------------------------------------------------------------------------


def validate_run(cfg: RunConfig, stages: list[str] | tuple[str, ...] = STAGES) -> None:
    """Checks that need more than the schema, done before any work starts: a `target.path`
    that holds a saved target (or, for a language model, a loadable model and tokenizer that fit
    the data settings), a Ray address that answers, and, when the decompose stage is selected,
    decompose module patterns that match modules of the target (the components are built on an
    untrained target, which is cheap for every toy)."""
    from scalespd.raytools import check_reachable  # noqa: PLC0415
    from scalespd.targets import build_target, module_info, module_paths  # noqa: PLC0415
    from scalespd.targets.io import META_FILE, MODEL_FILE  # noqa: PLC0415
    from scalespd.train.components import ComponentModel, match_modules  # noqa: PLC0415

    target = cfg.target
    if target.kind == "hf_causal_lm":
        from scalespd.targets.lm import preflight  # noqa: PLC0415

        preflight(target)
    elif target.path is not None and not ((target.path / META_FILE).is_file()
                                          and (target.path / MODEL_FILE).is_file()):
        raise ConfigError(f"target.path: {target.path} is not a saved target (expected "
                          f"{META_FILE} and {MODEL_FILE} there, as the target stage writes "
                          "them); fix the path or remove it to train the target")
    check_reachable(cfg.ray)
    if "decompose" not in stages:
        return
    paths = module_paths(target)
    try:
        module_C = match_modules([(m.pattern, m.C) for m in cfg.decompose.modules], paths)
        if target.kind != "hf_causal_lm":  # a language model may be large: patterns suffice
            ComponentModel(build_target(target), module_C, module_info(target), cfg.decompose)
    except ValueError as err:
        raise ConfigError(f"invalid config: decompose.modules: {err}") from None


# --------------------------------------------------------------------------------------------
# The run directory
# --------------------------------------------------------------------------------------------


def open_run_dir(run_dir: UPath) -> Manifest | None:
    """The manifest of an existing scalespd run directory, None for a new or empty one.
    Anything else (a file, a path under a file, a folder of other files) is refused."""
    for parent in [run_dir, *run_dir.parents]:
        if parent.exists() and not parent.is_dir():
            what = "is a file" if parent == run_dir else f"lies under the file {parent}"
            raise RunDirError(f"--run-dir {run_dir} {what}; choose a directory")
    if not run_dir.exists():
        return None
    manifest = Manifest.load(run_dir)
    if manifest is None and any(run_dir.iterdir()):
        raise RunDirError(
            f"--run-dir {run_dir} is not empty and holds no scalespd {MANIFEST}; scalespd "
            "writes only into a new or empty directory or one of its own runs (choose another "
            "--run-dir)")
    return manifest


@dataclass
class Plan:
    """What one invocation will do, decided before any work starts."""

    run: list[str]        # stages to run, in order
    invalidate: list[str]  # stages whose outputs are removed first (forced, stale or downstream)


def plan_run(manifest: Manifest, cfg: RunConfig, selected: list[str], forced: set[str],
             run_dir: UPath) -> Plan:
    """Decide what to run and what to invalidate; refuse what would lose finished work or
    cannot be done (a stage selected without the stages it needs)."""
    def changed(stage: str) -> bool:
        rec = manifest.record(stage)
        return rec is not None and rec.get("config_hash") != section_hash(
            cfg, STAGE_SECTIONS[stage])

    # A finished stage made with another config is only replaced when forced: the per-stage
    # hashes decide this, whether or not config.yaml is still there.
    stale = [s for s in STAGES if changed(s) and s not in forced
             and (manifest.record(s) or {}).get("status") == "complete"]
    if stale:
        raise RunDirError(
            f"{run_dir} holds a run made with a different config (stages {stale} would "
            f"change). Use another --run-dir, or --force {stale[0]} (or --force all) to redo "
            "them.")

    to_run = [s for s in selected if s in forced or not manifest.is_complete(s, cfg)]
    if not to_run:
        return Plan([], [])
    first = STAGES.index(to_run[0])
    # Every stage after the first one that runs gets new inputs: it runs too if selected, and
    # its old outputs are invalid either way.
    to_run = [s for s in selected if STAGES.index(s) >= first]
    missing = [s for s in STAGES[:first] if not manifest.is_complete(s, cfg)]
    if missing:
        raise RunDirError(
            f"stage {to_run[0]!r} needs {missing[0]!r}, which is not complete in {run_dir}; "
            f"run without --stages, or add {' '.join(missing)} to --stages")
    # The first stage keeps its partial outputs when they belong to this config (resume).
    keeps_partial = to_run[0] not in forced and not changed(to_run[0])
    invalidate = [s for s in STAGES[first:] if not (s == to_run[0] and keeps_partial)]
    return Plan(to_run, invalidate)


def remove_outputs(manifest: Manifest, stage: str, run_dir: UPath) -> None:
    """Remove what scalespd wrote for `stage` and mark it invalidated; files it did not write
    stay where they are (logged)."""
    folder = run_dir / stage
    ours = manifest.ours(stage, folder)
    for name in sorted(ours):
        p = folder / name
        log.info("[%s] removing %s", stage, url(p))
        remove(p)
    left = _entries(folder)
    if left:
        log.warning("[%s] keeping %s in %s: scalespd did not write %s", stage,
                    ", ".join(sorted(left)), folder, "it" if len(left) == 1 else "them")
    elif folder.is_dir():
        folder.rmdir()
    if manifest.record(stage) is not None:
        manifest.data["stages"][stage] = {"status": "invalidated", "updated_at": _now(),
                                          "foreign": sorted(left)}
        manifest.save()


def write_snapshot(run_dir: UPath, cfg: RunConfig) -> None:
    """config.yaml = the resolved config of the run; the one it replaces is kept as
    config.previous.yaml."""
    snapshot, new_yaml = run_dir / CONFIG_SNAPSHOT, config_to_yaml(cfg)
    if snapshot.exists():
        old = snapshot.read_text()
        if old == new_yaml:
            return
        write_text_atomic(run_dir / PREVIOUS_CONFIG, old)
    write_text_atomic(snapshot, new_yaml)


# --------------------------------------------------------------------------------------------
# Running stages
# --------------------------------------------------------------------------------------------


def _forced(force: list[str] | None) -> set[str]:
    forced: set[str] = set()
    for f in force or []:
        # A forced stage invalidates every later stage: their inputs change.
        forced |= set(STAGES) if f == "all" else set(STAGES[STAGES.index(f):])
    return forced


def run_pipeline(
    cfg: RunConfig,
    run_dir: PathLike,
    stages: list[str] | None = None,
    force: list[str] | None = None,
) -> Manifest:
    """Run (or resume) the selected stages in order. Writes nothing when nothing is to do.
    `run_dir` is a local path or an fsspec URL (`scalespd.storage`)."""
    run_dir = as_path(run_dir)
    selected = list(STAGES) if not stages else [s for s in STAGES if s in stages]
    forced = _forced(force)
    validate_run(cfg, selected)
    manifest = open_run_dir(run_dir) or Manifest(run_dir / MANIFEST)
    plan = plan_run(manifest, cfg, selected, forced, run_dir)
    for stage in selected:
        if stage not in plan.run:
            log.info("[%s] complete, skipping (use --force %s to redo)", stage, stage)
    if not plan.run:
        return manifest

    run_dir.mkdir(parents=True, exist_ok=True)
    manifest.data.update(format=MANIFEST_FORMAT, name=cfg.name, versions=_versions())
    manifest.data.setdefault("created_at", _now())
    manifest.save()
    for stage in plan.invalidate:
        remove_outputs(manifest, stage, run_dir)
    write_snapshot(run_dir, cfg)

    for stage in plan.run:
        run_stage(manifest, cfg, stage, run_dir)
    return manifest


def run_stage(manifest: Manifest, cfg: RunConfig, stage: str, run_dir: UPath) -> None:
    """Run one stage, recording running / complete / failed / interrupted in the manifest."""
    module = importlib.import_module(STAGE_MODULES[stage])
    folder = run_dir / stage
    rec = manifest.record(stage) or {}
    # What is in the folder now and is not a partial output of this stage is not scalespd's.
    foreign = sorted(_entries(folder) - manifest.ours(stage, folder)) if rec else sorted(
        _entries(folder))
    log.info("[%s] running", stage)
    manifest.mark(stage, cfg, "running", started_at=_now(), foreign=foreign)
    t0 = time.perf_counter()
    try:
        info = module.run(cfg, run_dir) or {}
    except KeyboardInterrupt:
        _mark_quietly(manifest, stage, cfg, "interrupted")
        raise
    except BaseException as err:
        _mark_quietly(manifest, stage, cfg, "failed", error=f"{type(err).__name__}: {err}")
        raise
    seconds = time.perf_counter() - t0
    files = sorted(_entries(folder) - set(foreign))
    manifest.mark(stage, cfg, "complete", seconds=round(seconds, 3), info=info, files=files)
    log.info("[%s] done in %.1f s", stage, seconds)


def _mark_quietly(manifest: Manifest, stage: str, cfg: RunConfig, status: str,
                  **extra: Any) -> None:
    """Record a stage's end while an error is on its way out: a manifest that cannot be
    written (disk full) must not hide that error."""
    try:
        manifest.mark(stage, cfg, status, **extra)
    except OSError as err:
        log.warning("[%s] could not record status %r in %s: %s", stage, status,
                    manifest.path, err)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m scalespd.run",
        description="Run the scalespd pipeline (SPD -> profiles -> graph -> clusters -> report).",
    )
    p.add_argument("config", nargs="?", help="YAML run config (default: the built-in default)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.FIELD=VALUE",
                   help="change one config field (VALUE is YAML; repeatable), e.g. --set "
                        "graph.k=15; recorded in the run's config.yaml")
    p.add_argument("--show-config", action="store_true",
                   help="print the resolved config, each field with its meaning, and exit "
                        "(the reference: docs/config.md)")
    p.add_argument("--run-dir",
                   help="run directory: a local path or an fsspec URL such as s3://bucket/runs/x "
                        "(default: runs/<name>)")
    p.add_argument("--stages", nargs="+", choices=STAGES, help="run only these stages")
    p.add_argument("--force", nargs="+", choices=(*STAGES, "all"), default=[],
                   help="redo these stages (and the ones after them)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def _sigterm_as_interrupt(signum: int, frame: FrameType | None) -> None:
    # `ray job stop` and schedulers send SIGTERM: record the stage as interrupted, like Ctrl-C.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    on_main_thread = threading.current_thread() is threading.main_thread()
    if on_main_thread:  # signal handlers can only be set there
        previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.show_config:
            from scalespd.configdoc import commented_yaml  # noqa: PLC0415

            print(commented_yaml(cfg))
            return 0
        run_dir = as_path(args.run_dir) if args.run_dir else as_path("runs") / cfg.name
        manifest = run_pipeline(cfg, run_dir, args.stages, args.force)
    except KeyboardInterrupt:
        print(f"\n{INTERRUPTED_MESSAGE}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as err:
        user = storage_error(err)
        if user is None:
            raise  # an internal bug: keep the traceback
        print(f"error: {user}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    _print_summary(run_dir, manifest)
    return 0


def _print_summary(run_dir: UPath, manifest: Manifest) -> None:
    print(f"\nrun directory: {url(run_dir)}")
    for stage, rec in manifest.data["stages"].items():
        secs = rec.get("seconds")
        print(f"  {stage:<10} {rec['status']:<11} {'' if secs is None else f'{secs:8.1f} s'}")
    report = run_dir / "report" / "index.html"
    if report.exists():
        print(f"report: {url(report)}")


if __name__ == "__main__":
    sys.exit(main())
