"""`python -m scalespd.run [cfg.yaml] [--run-dir DIR] [--stages ...] [--force ...]`

Runs the pipeline target -> decompose -> profiles -> graph -> spectral -> report on one node
(Ray in-process) or, under `ray job submit`, on the job's Ray cluster. Each stage reads the
previous stage's outputs from the run directory; a stage recorded as complete in
`manifest.json` is skipped on re-run, and `--force STAGE` redoes it (and every stage after it,
since their inputs change). An interrupted stage resumes from what it had written (the decompose
stage from its latest checkpoint, the profiles stage from its completion record).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from scalespd.config import ConfigError, RunConfig, config_to_yaml, load_config

log = logging.getLogger("scalespd")

STAGES: tuple[str, ...] = ("target", "decompose", "profiles", "graph", "spectral", "report")
# Each stage module exposes `run(cfg: RunConfig, run_dir: Path) -> dict` returning a small
# JSON-able summary for the manifest, and writes under run_dir/<stage dir>.
STAGE_MODULES: dict[str, str] = {
    "target": "scalespd.targets.stage",
    "decompose": "scalespd.train.stage",
    "profiles": "scalespd.profiles.stage",
    "graph": "scalespd.graph.stage",
    "spectral": "scalespd.spectral.stage",
    "report": "scalespd.report.stage",
}
STAGE_DIRS: dict[str, str] = {s: s for s in STAGES}
# Which config sections each stage depends on (a change there makes its output stale).
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "target": ("target",),
    "decompose": ("target", "decompose"),
    "profiles": ("target", "decompose", "profiles"),
    "graph": ("target", "decompose", "profiles", "graph"),
    "spectral": ("target", "decompose", "profiles", "graph", "spectral"),
    "report": ("target", "decompose", "profiles", "graph", "spectral", "report"),
}


class StageNotBuilt(RuntimeError):
    """Raised when a stage's package does not exist yet."""


class RunDirError(RuntimeError):
    """The run directory holds something this run must not overwrite."""


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


def section_hash(cfg: RunConfig, sections: tuple[str, ...]) -> str:
    payload = json.dumps({s: getattr(cfg, s).model_dump(mode="json") for s in sections},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("scalespd", "torch", "ray", "numpy", "scipy", "zarr", "sklearn", "dask"):
        try:
            out[name] = str(importlib.import_module(name).__version__)
        except Exception:  # version info is best-effort metadata
            pass
    return out


@dataclass
class Manifest:
    path: Path
    data: dict[str, Any]

    @classmethod
    def load(cls, run_dir: Path) -> Manifest:
        path = run_dir / "manifest.json"
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise RunDirError(f"{path} is not valid JSON ({err}); refusing to touch it") from None
        else:
            data = {"stages": {}}
        data.setdefault("stages", {})
        return cls(path, data)

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)  # atomic: a crash never leaves half a manifest

    def is_complete(self, stage: str, cfg: RunConfig) -> bool:
        rec = self.data["stages"].get(stage)
        return bool(
            rec
            and rec.get("status") == "complete"
            and rec.get("config_hash") == section_hash(cfg, STAGE_SECTIONS[stage])
        )

    def mark(self, stage: str, cfg: RunConfig, status: str, **extra: Any) -> None:
        rec = {
            "status": status,
            "config_hash": section_hash(cfg, STAGE_SECTIONS[stage]),
            "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        rec.update(extra)
        self.data["stages"][stage] = rec
        self.save()


# --------------------------------------------------------------------------------------------
# Pre-flight validation
# --------------------------------------------------------------------------------------------


def validate_run(cfg: RunConfig) -> None:
    """Checks that need more than the schema, done before any work starts (e.g. that every
    decompose module pattern matches a module of the target)."""
    try:
        from scalespd.targets import module_paths  # noqa: PLC0415
        from scalespd.train.components import match_modules  # noqa: PLC0415
    except ModuleNotFoundError:
        return  # those stages are not built; they will say so when reached
    from scalespd.targets import build_target, module_info  # noqa: PLC0415
    from scalespd.train.components import ComponentModel  # noqa: PLC0415

    paths = module_paths(cfg.target)
    try:
        module_C = match_modules([(m.pattern, m.C) for m in cfg.decompose.modules], paths)
        # Building the components on an untrained target is cheap for every toy and surfaces
        # the remaining structural errors (e.g. tied modules with different C) before any work.
        ComponentModel(build_target(cfg.target), module_C, module_info(cfg.target),
                       cfg.decompose)
    except ValueError as err:
        raise ConfigError(f"invalid config: decompose.modules: {err}") from None


# --------------------------------------------------------------------------------------------
# Running stages
# --------------------------------------------------------------------------------------------


def load_stage(stage: str):
    modname = STAGE_MODULES[stage]
    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as err:
        if err.name and modname.startswith(err.name):
            raise StageNotBuilt(
                f"stage '{stage}' is not built yet in this version of scalespd ({modname} is "
                f"missing)"
            ) from None
        raise


def prepare_run_dir(run_dir: Path, cfg: RunConfig, force: set[str]) -> Manifest:
    """Create or re-open a run directory. An existing run with a different config is never
    overwritten unless the differing stages are forced."""
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.load(run_dir)
    snapshot = run_dir / "config.yaml"
    new_yaml = config_to_yaml(cfg)
    if snapshot.exists() and snapshot.read_text() != new_yaml:
        stale = [
            s for s, rec in manifest.data["stages"].items()
            if rec.get("config_hash") != section_hash(cfg, STAGE_SECTIONS[s]) and s not in force
        ]
        if stale:
            raise RunDirError(
                f"{run_dir} holds a run made with a different config (stages {stale} would "
                f"change). Use another --run-dir, or --force {stale[0]} (or --force all) to "
                f"redo them."
            )
        # Keep the previous snapshot next to the new one rather than losing it.
        shutil.copy2(snapshot, run_dir / "config.previous.yaml")
    snapshot.write_text(new_yaml)
    manifest.data["name"] = cfg.name
    manifest.data["versions"] = _versions()
    manifest.data.setdefault("created_at", datetime.now(UTC).isoformat(timespec="seconds"))
    manifest.save()
    return manifest


def run_pipeline(
    cfg: RunConfig,
    run_dir: Path,
    stages: list[str] | None = None,
    force: list[str] | None = None,
) -> Manifest:
    """Run (or resume) the selected stages in order."""
    selected = list(STAGES) if not stages else [s for s in STAGES if s in stages]
    forced: set[str] = set()
    for f in force or []:
        if f == "all":
            forced |= set(STAGES)
        else:
            # A forced stage invalidates every later stage: their inputs change.
            forced |= set(STAGES[STAGES.index(f):])
    validate_run(cfg)
    manifest = prepare_run_dir(run_dir, cfg, forced)

    for stage in selected:
        if manifest.is_complete(stage, cfg) and stage not in forced:
            log.info("[%s] complete, skipping (use --force %s to redo)", stage, stage)
            continue
        module = load_stage(stage)
        out = run_dir / STAGE_DIRS[stage]
        if stage in forced and out.exists():
            log.info("[%s] --force: removing %s", stage, out)
            shutil.rmtree(out)
        prev = manifest.data["stages"].get(stage)
        if prev and prev.get("config_hash") != section_hash(cfg, STAGE_SECTIONS[stage]):
            # Config changed for an unfinished stage: partial outputs belong to the old config.
            if out.exists():
                shutil.rmtree(out)
        log.info("[%s] running", stage)
        manifest.mark(stage, cfg, "running")
        t0 = time.perf_counter()
        info = module.run(cfg, run_dir) or {}
        seconds = time.perf_counter() - t0
        manifest.mark(stage, cfg, "complete", seconds=round(seconds, 3), info=info)
        log.info("[%s] done in %.1f s", stage, seconds)
    return manifest


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m scalespd.run",
        description="Run the scalespd pipeline (SPD -> profiles -> graph -> clusters -> report).",
    )
    p.add_argument("config", nargs="?", help="YAML run config (default: the built-in default)")
    p.add_argument("--run-dir", type=Path, help="run directory (default: runs/<name>)")
    p.add_argument("--stages", nargs="+", choices=STAGES, help="run only these stages")
    p.add_argument("--force", nargs="+", choices=(*STAGES, "all"), default=[],
                   help="redo these stages (and the ones after them)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        cfg = load_config(args.config)
        run_dir = args.run_dir or Path("runs") / cfg.name
        manifest = run_pipeline(cfg, run_dir, args.stages, args.force)
    except (ConfigError, RunDirError, StageNotBuilt) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _print_summary(run_dir, manifest)
    return 0


def _print_summary(run_dir: Path, manifest: Manifest) -> None:
    print(f"\nrun directory: {run_dir}")
    for stage, rec in manifest.data["stages"].items():
        secs = rec.get("seconds")
        print(f"  {stage:<10} {rec['status']:<9} {'' if secs is None else f'{secs:8.1f} s'}")
    report = run_dir / "report" / "index.html"
    if report.exists():
        print(f"report: {report}")


if __name__ == "__main__":
    sys.exit(main())
