"""The decompose stage under Ray Train: one `TorchTrainer` run per run directory, resumable.

Layout under `run_dir/decompose/`:

    config.json                       the target + decompose config these files belong to
    ray/decompose/checkpoint_<step>/  Ray Train checkpoints: state.pt (trainer state),
                                      metrics.json (evaluate()), ci_heatmap.png
    ray/decompose/checkpoint_manager_snapshot.json   Ray Train's record of its checkpoints
    attempts.jsonl                    one line per (re)start of the workers: start step, world size
    final/model.pt, final/meta.json   the finished SPD model (final/ appears complete or not at all)
    metrics.json, ci_heatmap.png      final decomposition metrics and CI heatmap

Resuming. Ray Train's own resume (`ray.train.get_checkpoint()`, from its snapshot) lags the
checkpoint folders: a checkpoint is on disk before the controller records it, so a Ctrl-C or a
kill between the two resumed one or two checkpoints early; and a snapshot cut short by a full
disk made every later run fail. So the driver picks the checkpoint (`prepare_resume`): the
newest `checkpoint_<step>` folder on disk whose state.pt loads and holds that step. Damaged
checkpoints newer than it and a damaged snapshot are reported and moved aside (renamed
`*.damaged-<time>`, never deleted), so Ray starts a fresh checkpoint manager when it must and
never hands out a damaged checkpoint. Workers load the driver's checkpoint unless Ray's is newer
(a worker-group restart within the same fit under `FailureConfig(max_failures)`).

A checkpoint folder appears complete or not at all: rank 0 writes it under a staging name in the
same folder and Ray's upload step renames it into place. Checkpoints Ray does not track (the
ones it never recorded, or all of them after a fresh start) are pruned once the run finishes,
keeping what Ray keeps (`CHECKPOINTS_TO_KEEP`).

Ctrl-C: `fit()` is made to end with KeyboardInterrupt once the workers are stopped (see
`launch`); a disk that fills up in a worker ends it with a `StorageError` naming the file.

Ray sets up the torch process group (gloo on CPU, nccl on GPU) before `train_loop_per_worker`
runs; the SPD trainer only needs its rank and world size.

Where the run directory lives (`scalespd.storage`): Ray Train's storage_path follows it.

* A filesystem every process sees (a local or shared disk, s3://, gs://, ...): Ray Train keeps
  its checkpoints and snapshot in run_dir/decompose/ray on that filesystem (for a URL through
  `storage_filesystem`, pyarrow's wrapper of the fsspec filesystem). Locally a checkpoint is
  committed by a rename as above; an object store has no rename, so rank 0 writes the
  checkpoint into a local temporary folder and uploads its files with state.pt last: state.pt
  is what `checkpoint_problem` validates, so a checkpoint without it is never resumed from.
  final/ is written in place there with final/meta.json last (`read_final_meta` needs both),
  and attempts.jsonl is rewritten whole (no append). Workers get run_dir as `storage.url`.
* A filesystem only this process sees (memory://): the workers could not reach it, so the
  stage runs on a local temporary copy (run_dir/target and, to resume, run_dir/decompose) and
  copies decompose/ back when it ends, however it ends.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from upath import UPath

from scalespd import storage
from scalespd.config import RunConfig
from scalespd.errors import STORAGE_ERRNOS, StorageError, naming_file, storage_error
from scalespd.train.io import (
    FINAL_DIR,
    META_FILE,
    MODEL_FILE,
    load_torch,
    model_state,
    read_final_meta,
    save_torch,
)

if TYPE_CHECKING:
    from scalespd.train.trainer import SPDTrainer

log = logging.getLogger(__name__)

RAY_RUN_NAME = "decompose"  # stable: a re-run of the same run directory resumes this Ray run
CHECKPOINTS_TO_KEEP = 3
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.json"
# Rank 0 writes decompose/progress.json ({"step", "steps"}) every this many steps; the driver
# draws a progress bar from it on a terminal (the workers run in other processes).
PROGRESS_FILE = "progress.json"
PROGRESS_EVERY = 10
HEATMAP_FILE = "ci_heatmap.png"
ATTEMPTS_FILE = "attempts.jsonl"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's name for it
STAGING_PREFIX = ".staging-"  # a checkpoint being written; never a checkpoint Ray or we resume
DAMAGED_SUFFIX = ".damaged-"
_CHECKPOINT_RE = re.compile(r"checkpoint_(\d{7,})")


def decompose_dir(run_dir: storage.PathLike) -> UPath:
    return storage.as_path(run_dir) / "decompose"


def storage_path(run_dir: storage.PathLike) -> UPath:
    """Where Ray Train keeps this run's checkpoints (absolute: Ray requires it)."""
    d = decompose_dir(run_dir)
    return (d.resolve() if storage.is_local(d) else d) / "ray"


def checkpoint_root(run_dir: storage.PathLike) -> UPath:
    return storage_path(run_dir) / RAY_RUN_NAME


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:07d}"


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint folder name, None for anything else (staging, damaged, ...)."""
    m = _CHECKPOINT_RE.fullmatch(name)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------------------------
# Checkpoints on disk (driver and workers)
# --------------------------------------------------------------------------------------------


def load_state(path: storage.PathLike, map_location: str | torch.device = "cpu"
               ) -> dict[str, Any]:
    """The trainer state in checkpoint folder `path`."""
    # weights_only=False: the file is this run's own trainer state (optimizer state included).
    return load_torch(storage.as_path(path) / STATE_FILE, map_location=map_location,
                      weights_only=False)


def checkpoint_problem(path: storage.PathLike) -> str | None:
    """Why checkpoint folder `path` cannot be resumed from, None when it can: its state.pt must
    load and hold the step its name says. Loading is cheap for the toy models (a few MB)."""
    path = storage.as_path(path)
    step = checkpoint_step(path.name)
    if step is None:
        return "not a checkpoint folder name"
    if not (path / STATE_FILE).is_file():
        return f"{STATE_FILE} is missing"
    try:
        state = load_state(path)
    except Exception as err:  # truncated, garbage, unreadable: all mean "do not resume here"
        return f"{STATE_FILE} does not load ({type(err).__name__}: {err})"
    if not isinstance(state, dict) or "step" not in state:
        return f"{STATE_FILE} holds no trainer state"
    if int(state["step"]) != step:
        return f"{STATE_FILE} holds step {state['step']}, not {step}"
    return None


def checkpoint_dirs(run_dir: storage.PathLike) -> list[tuple[int, UPath]]:
    """(step, folder) of every checkpoint folder on disk, newest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p.name), p) for p in root.iterdir() if p.is_dir()]
    return sorted(((s, p) for s, p in found if s is not None), reverse=True)


def find_resume_checkpoint(run_dir: storage.PathLike) -> tuple[int, UPath] | None:
    """(step, folder) of the newest checkpoint on disk that can be resumed from, None if there
    is none. Newer damaged ones are logged (by path) and skipped; nothing is moved here."""
    for step, path in checkpoint_dirs(run_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            return step, path
        log.warning("decompose: checkpoint %s is damaged (%s); resuming from an earlier one",
                    path, problem)
    return None


def latest_checkpoint_step(run_dir: storage.PathLike) -> int | None:
    """Step a (re)start of the decompose stage resumes from: the newest valid checkpoint on
    disk (see `find_resume_checkpoint`), None if there is none."""
    found = find_resume_checkpoint(run_dir)
    return None if found is None else found[0]


def _aside_name(path: UPath) -> UPath:
    """`path` renamed to `<name>.damaged-<time>` (a free name): kept for inspection, never
    deleted, and no longer a name Ray Train or the resume logic looks at."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    cand, n = path.with_name(f"{path.name}{DAMAGED_SUFFIX}{stamp}"), 1
    while cand.exists():
        n += 1
        cand = path.with_name(f"{path.name}{DAMAGED_SUFFIX}{stamp}-{n}")
    return cand


def _move_aside(path: UPath) -> UPath:
    """Rename `path` (a folder or a file) aside; on an object store a copy and a delete."""
    dest = _aside_name(path)
    with naming_file(storage.url(path)):
        storage.rename_dir(path, dest)
    return dest


def snapshot_problem(snapshot: storage.PathLike) -> str | None:
    """Why Ray Train could not start from `snapshot` (a cut or garbled file, a record of
    checkpoints that are not on disk), None if it can. Ray itself fails with an error that
    names no file and keeps failing on every later run."""
    snapshot = storage.as_path(snapshot)
    try:
        data = json.loads(snapshot.read_text())
        results = data["checkpoint_results"]
        names = [r["checkpoint_dir_name"] for r in results]
        latest = data.get("latest_checkpoint_result")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return "checkpoint_results is malformed"
        if len(data["checkpoint_report_indices"]) != len(names):
            return "checkpoint_report_indices does not match checkpoint_results"
        if latest is not None and latest["checkpoint_dir_name"] not in names:
            return "latest_checkpoint_result is not among checkpoint_results"
        if any(r["checkpoint_dir_name"] not in names for r in data["pending_training_results"]):
            return "pending_training_results are not among checkpoint_results"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        return f"not a readable snapshot: {type(err).__name__}: {err}"
    try:  # the schema Ray Train parses it with, where this Ray has it (internal API)
        from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (  # noqa: PLC0415
            _CheckpointManagerState,
        )
    except ImportError:
        pass
    else:
        parse = getattr(_CheckpointManagerState, "model_validate", None) or \
            _CheckpointManagerState.parse_obj  # pydantic 2, or 1 through Ray's compat layer
        try:
            parse(data)
        except Exception as err:  # pydantic's ValidationError (v1 or v2)
            return f"does not match Ray Train's snapshot schema: {err}"
    missing = [n for n in names if not (snapshot.parent / n).is_dir()]
    if missing:
        return f"it lists {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} " \
               f"not on disk (or damaged)"
    return None


def _remove_staging(root: UPath) -> None:
    """Checkpoints a killed run was still writing: partial by definition, and ours alone."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(STAGING_PREFIX) and p.is_dir():
            log.info("decompose: removing %s, a checkpoint a previous run did not finish", p)
            _rmtree_quietly(p)


def _rmtree_quietly(path: storage.PathLike) -> None:
    try:
        storage.rmtree(path)
    except OSError as err:
        log.debug("decompose: could not remove %s: %s", path, err)


def prepare_resume(run_dir: storage.PathLike) -> tuple[int, UPath] | None:
    """Driver, before each fit: choose the checkpoint to resume from and leave Ray Train a
    checkpoint folder it can start from.

    * the newest valid checkpoint on disk is chosen (`find_resume_checkpoint`);
    * damaged checkpoints newer than it are moved aside: otherwise Ray's next checkpoint of that
      step would be written over them, and a snapshot listing them would hand them out;
    * a snapshot Ray cannot start from (cut short, garbled, listing folders that are gone) is
      moved aside: Ray then starts a fresh checkpoint manager.
    Everything moved aside is logged as a warning naming the file."""
    root = checkpoint_root(run_dir)
    _remove_staging(root)
    found = find_resume_checkpoint(run_dir)
    newest_ok = -1 if found is None else found[0]
    for step, path in checkpoint_dirs(run_dir):
        if step > newest_ok:
            dest = _move_aside(path)
            log.warning("decompose: moved the damaged checkpoint %s to %s", path, dest.name)
    snapshot = root / SNAPSHOT_FILE
    if snapshot.exists():
        problem = snapshot_problem(snapshot)
        if problem is not None:
            dest = _move_aside(snapshot)
            log.warning("decompose: Ray Train's checkpoint snapshot %s is damaged (%s); moved it "
                        "to %s, Ray Train starts a fresh one", snapshot, problem, dest.name)
    return found


def snapshot_checkpoints(run_dir: storage.PathLike) -> list[str] | None:
    """Checkpoint folder names Ray Train's snapshot lists, None if it cannot be read."""
    try:
        data = json.loads((checkpoint_root(run_dir) / SNAPSHOT_FILE).read_text())
        return [r["checkpoint_dir_name"] for r in data["checkpoint_results"]]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None


def prune_untracked_checkpoints(run_dir: storage.PathLike) -> None:
    """After a finished fit: remove checkpoint folders Ray Train does not track and that are
    older than its newest. Ray prunes only what its snapshot lists (CHECKPOINTS_TO_KEEP), so the
    folder a run resumed from without Ray knowing it, and those of a run whose snapshot was
    moved aside, would otherwise stay forever."""
    tracked = snapshot_checkpoints(run_dir)
    if not tracked:
        return
    newest = max((s for s in map(checkpoint_step, tracked) if s is not None), default=None)
    if newest is None:
        return
    for step, path in checkpoint_dirs(run_dir):
        if step < newest and path.name not in tracked:
            log.info("decompose: removing %s (superseded; Ray Train keeps the newest %d)", path,
                     CHECKPOINTS_TO_KEEP)
            storage.rmtree(path)


# --------------------------------------------------------------------------------------------
# Inside each worker
# --------------------------------------------------------------------------------------------


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, torch.Tensor):
            v = v.item() if v.numel() == 1 else v.tolist()
        out[str(k)] = v
    return out


def write_progress(run_dir: storage.PathLike, step: int, steps: int) -> None:
    """decompose/progress.json, replaced atomically (the driver may read it at any time).
    Advisory only: a write that fails (a full disk) is skipped, and the checkpoint writes
    report the storage problem."""
    path = decompose_dir(run_dir) / PROGRESS_FILE
    try:
        storage.write_text_atomic(path, json.dumps({"step": step, "steps": steps}))
    except OSError:
        pass


class _ProgressBar:
    """On a terminal, a driver-side bar of the training steps, read from progress.json once a
    second by a daemon thread while trainer.fit() runs; nothing elsewhere."""

    def __init__(self, run_dir: storage.PathLike, steps: int) -> None:
        self.path = decompose_dir(run_dir) / PROGRESS_FILE
        self.steps = steps
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> _ProgressBar:
        from scalespd.progress import on_terminal  # noqa: PLC0415

        if on_terminal():
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def _run(self) -> None:
        from tqdm.auto import tqdm  # noqa: PLC0415

        with tqdm(total=self.steps, desc="decompose steps", unit="step", leave=False) as bar:
            while not self.stop.wait(1.0):
                try:
                    step = int(json.loads(self.path.read_text())["step"])
                except (OSError, ValueError, KeyError):
                    continue  # not written yet
                bar.update(max(0, step - bar.n))


def _staging_dir(root: UPath, step: int) -> Path:
    """Where rank 0 writes the checkpoint of `step` before `_commit_checkpoint` renames it into
    place: in the checkpoint folder itself, so the commit is a rename on the same file system.
    Where there is no rename (an object store), a local temporary folder that
    `_upload_checkpoint` copies from."""
    name = f"{STAGING_PREFIX}{checkpoint_name(step)}-{os.getpid()}"
    if storage.has_rename(root):
        return storage.local_path(root) / name
    return Path(tempfile.mkdtemp(prefix="scalespd-ckpt-")) / name


def _write_checkpoint_files(trainer: SPDTrainer, eval_metrics: dict[str, Any], step: int,
                            d: Path) -> None:
    """Rank 0: everything needed to resume and inspect, into the (new) folder `d`."""
    shutil.rmtree(d, ignore_errors=True)
    with naming_file(d):
        d.mkdir(parents=True)
    save_torch(trainer.state_dict(), d / STATE_FILE)
    storage.write_text_atomic(d / METRICS_FILE,
                              json.dumps({"step": step, **eval_metrics}, indent=2))
    with naming_file(d / HEATMAP_FILE):
        trainer.save_ci_heatmap(d / HEATMAP_FILE)


def _commit_checkpoint(checkpoint: Any, dir_name: str) -> Any:
    """Ray Train's `checkpoint_upload_fn`: the staging folder already lies in the experiment
    folder, so uploading is a rename, and a checkpoint folder is complete or absent."""
    import ray.train  # noqa: PLC0415

    staging = Path(checkpoint.path)
    dest = staging.parent / dir_name
    if dest.exists():
        # Written by an earlier attempt of this same fit that Ray never recorded (a worker
        # restart resumed from an older checkpoint): the same step of the same trajectory.
        old = dest.with_name(f"{STAGING_PREFIX}replaced-{dir_name}-{os.getpid()}")
        log.info("decompose: replacing %s, which Ray Train never recorded", dest)
        dest.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    with naming_file(dest):
        staging.rename(dest)
    return ray.train.Checkpoint.from_directory(str(dest))


def _upload_checkpoint(checkpoint: Any, dir_name: str, root: UPath) -> Any:
    """Ray Train's `checkpoint_upload_fn` where there is no rename (an object store): copy the
    local staging folder's files to root/dir_name, state.pt last. A checkpoint folder without
    state.pt is not one `checkpoint_problem` accepts, so an upload cut short is never resumed
    from. Returns the checkpoint on Ray Train's storage filesystem."""
    import ray.train  # noqa: PLC0415

    src = Path(checkpoint.path)
    dest = root / dir_name
    if dest.exists():
        # As in `_commit_checkpoint`: an earlier attempt's checkpoint Ray never recorded. Its
        # state.pt goes first, so that a half-removed folder is not a valid checkpoint.
        log.info("decompose: replacing %s, which Ray Train never recorded", storage.url(dest))
        if (dest / STATE_FILE).exists():
            (dest / STATE_FILE).unlink()
        storage.rmtree(dest)
    files = sorted((f for f in src.rglob("*") if f.is_file()),
                   key=lambda f: (f.name == STATE_FILE, f.as_posix()))
    for f in files:
        target = dest / f.relative_to(src).as_posix()
        with naming_file(storage.url(target)):
            target.write_bytes(f.read_bytes())
    fs = ray.train.get_context().get_storage().storage_filesystem
    return ray.train.Checkpoint(path=dest.path, filesystem=fs)


def _write_final(trainer: SPDTrainer, cfg: RunConfig, run_dir: UPath,
                 eval_metrics: dict[str, Any], world_size: int) -> None:
    """Rank 0: the finished model and metrics. `final/` appears only when complete: renamed
    into place locally; on an object store written in place with meta.json removed first and
    written last (`read_final_meta` needs both files)."""
    out = decompose_dir(run_dir)
    meta = {
        "steps": trainer.step,
        "world_size": world_size,
        "target": cfg.target.model_dump(mode="json"),
        "decompose": cfg.decompose.model_dump(mode="json"),
        "metrics": eval_metrics,
    }
    final = out / FINAL_DIR
    tmp = out / f"{FINAL_DIR}.tmp"
    if storage.has_rename(out):
        shutil.rmtree(storage.local_path(tmp), ignore_errors=True)
        tmp.mkdir(parents=True)
        save_torch(model_state(trainer.model), tmp / MODEL_FILE)
        storage.write_text_atomic(tmp / META_FILE, json.dumps(meta, indent=2))
    else:
        if (final / META_FILE).exists():
            (final / META_FILE).unlink()
        save_torch(model_state(trainer.model), final / MODEL_FILE)
    with naming_file(storage.url(out / HEATMAP_FILE)):
        trainer.save_ci_heatmap(out / HEATMAP_FILE)
    storage.write_text_atomic(out / METRICS_FILE,
                              json.dumps({"step": trainer.step, **eval_metrics}, indent=2))
    if storage.has_rename(out):
        shutil.rmtree(storage.local_path(final), ignore_errors=True)
        tmp.replace(final)
    else:
        storage.write_text_atomic(final / META_FILE, json.dumps(meta, indent=2))


def _log_attempt(run_dir: UPath, record: dict[str, Any]) -> None:
    """One line in decompose/attempts.jsonl: appended locally; an object store has no append,
    so there the file is read and written back whole (one writer: rank 0 of one fit)."""
    path = decompose_dir(run_dir) / ATTEMPTS_FILE
    line = json.dumps(record) + "\n"
    if storage.is_local(path):
        with naming_file(storage.url(path)), path.open("a") as f:
            f.write(line)
        return
    before = path.read_text() if path.exists() else ""
    if before and not before.endswith("\n"):
        before += "\n"
    storage.write_text_atomic(path, before + line)


def _quiet_ray_train_reports() -> None:
    """Ray Train logs each report's whole metrics dict at INFO; our own progress line suffices.

    The module's own logger object is quieted: Ray names it after the file path
    (`logging.getLogger(__file__)`), so looking it up by dotted name would miss it."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: keep its logging as it is
        return
    logger = getattr(context, "logger", None)
    if isinstance(logger, logging.Logger):
        logger.setLevel(logging.WARNING)


def _initial_state(ray_checkpoint: Any, resume: dict[str, Any] | None,
                   device: torch.device) -> tuple[dict[str, Any] | None, str | None]:
    """(trainer state to start from, checkpoint folder name) or (None, None) for a fresh start.

    The driver's pick (`resume`, the newest valid checkpoint on disk when the fit started) wins
    unless Ray Train hands out a newer one: that happens only when Ray restarts the worker group
    within this fit, after this fit reported newer checkpoints."""
    ray_step = None
    if ray_checkpoint is not None:
        ray_step = checkpoint_step(Path(ray_checkpoint.path).name)
    if ray_checkpoint is not None and (resume is None or (ray_step or -1) > resume["step"]):
        with ray_checkpoint.as_directory() as d:
            return load_state(Path(d), device), Path(ray_checkpoint.path).name
    if resume is not None:
        where = storage.as_path(resume["path"])
        return load_state(where, device), where.name
    return None, None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The body each Ray Train worker runs.

    config: {"run": RunConfig as JSON, "run_dir": str (`storage.url`), "threads": int,
    "resume": {"step", "path"} or None}. A storage failure (disk full, permissions) leaves the
    worker as a `StorageError` naming the file, which pickles to the driver intact (a cause
    chain would not)."""
    try:
        _train(config)
    except Exception as err:
        user = storage_error(err)
        if user is None or user is err:
            raise
        raise user from err


def _train(config: dict[str, Any]) -> None:
    import ray.train  # noqa: PLC0415
    import ray.train.torch  # noqa: PLC0415

    from scalespd.targets import load_target  # noqa: PLC0415
    from scalespd.train.trainer import SPDTrainer  # noqa: PLC0415

    _quiet_ray_train_reports()
    cfg = RunConfig.model_validate(config["run"])
    dcfg = cfg.decompose
    run_dir = storage.as_path(config["run_dir"])
    torch.set_num_threads(int(config.get("threads", 1)))

    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    target, target_cfg = load_target(run_dir / "target")
    data = None
    if target_cfg.kind == "hf_causal_lm":
        from scalespd.train.lm import load_sequences  # noqa: PLC0415

        data = load_sequences(run_dir / "target")
    trainer = SPDTrainer(target, target_cfg, dcfg, device=device, rank=rank,
                         world_size=world_size, data=data)

    state, source = _initial_state(ray.train.get_checkpoint(), config.get("resume"), device)
    if state is not None:
        trainer.load_state_dict(state)
        log.info("rank %d resumed from %s at step %d", rank, source, trainer.step)
    else:
        trainer.faithfulness_warmup()
    if rank == 0:
        _log_attempt(run_dir, {"start_step": trainer.step, "resumed": state is not None,
                               "checkpoint": source, "world_size": world_size,
                               "time": time.time()})

    eval_metrics: dict[str, Any] | None = None
    t0, steps_done = time.perf_counter(), 0
    while trainer.step < dcfg.steps:
        metrics = trainer.train_step()
        steps_done += 1
        step = trainer.step  # number of optimisation steps completed
        if step % dcfg.save_every == 0 or step == dcfg.steps:
            eval_metrics = _report_with_checkpoint(trainer, metrics, step, rank, t0, steps_done,
                                                   checkpoint_root(run_dir))
        elif step % dcfg.log_every == 0:
            ray.train.report(_train_metrics(metrics, step, t0, steps_done))
        if rank == 0 and step % dcfg.log_every == 0:
            log.info("decompose step %d/%d  loss %.4g  (%.1f steps/s)", step, dcfg.steps,
                     metrics.get("total", float("nan")),
                     steps_done / max(time.perf_counter() - t0, 1e-9))
        if rank == 0 and step % PROGRESS_EVERY == 0:
            write_progress(run_dir, step, dcfg.steps)

    if rank == 0:
        if eval_metrics is None:
            # Resumed from the checkpoint of the last step (killed before final/ was written).
            eval_metrics = _jsonable(trainer.evaluate())
        _write_final(trainer, cfg, run_dir, eval_metrics, world_size)


def _train_metrics(metrics: dict[str, Any], step: int, t0: float, steps_done: int
                   ) -> dict[str, Any]:
    out = _jsonable(metrics)
    out["step"] = step
    out["steps_per_s"] = steps_done / max(time.perf_counter() - t0, 1e-9)
    return out


def _report_with_checkpoint(trainer: SPDTrainer, metrics: dict[str, Any], step: int, rank: int,
                            t0: float, steps_done: int, root: UPath) -> dict[str, Any]:
    """Report on every rank; rank 0 evaluates and attaches a checkpoint. Returns rank 0's eval
    metrics ({} on other ranks)."""
    import ray.train  # noqa: PLC0415

    report = _train_metrics(metrics, step, t0, steps_done)
    if rank != 0:
        # evaluate() is deterministic and uses no collectives: rank 0's result is the result.
        ray.train.report(report)
        return {}
    eval_metrics = _jsonable(trainer.evaluate())
    report.update({f"eval/{k}": v for k, v in eval_metrics.items()})
    d = _staging_dir(root, step)
    upload = (_commit_checkpoint if storage.has_rename(root)
              else partial(_upload_checkpoint, root=root))
    try:
        _write_checkpoint_files(trainer, eval_metrics, step, d)
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(str(d)),
                         checkpoint_dir_name=checkpoint_name(step),
                         checkpoint_upload_fn=upload)
    finally:
        shutil.rmtree(d, ignore_errors=True)  # still there only if the commit did not happen
        if not storage.has_rename(root):
            shutil.rmtree(d.parent, ignore_errors=True)  # the local temporary folder
    return eval_metrics


# --------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------


def _check_local_resources(cfg: RunConfig) -> None:
    """On a Ray this process started itself (no cluster address), workers that cannot fit would
    make Ray Train wait for resources forever: say so instead. A real cluster may autoscale."""
    import ray  # noqa: PLC0415

    from scalespd.errors import ConfigError  # noqa: PLC0415

    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return
    dcfg = cfg.decompose
    have = ray.cluster_resources()
    need_cpu = dcfg.num_workers * dcfg.cpus_per_worker
    if need_cpu > have.get("CPU", 0):
        raise ConfigError(
            f"decompose.num_workers ({dcfg.num_workers}) x decompose.cpus_per_worker "
            f"({dcfg.cpus_per_worker}) = {need_cpu} CPUs, but the local Ray has "
            f"{int(have.get('CPU', 0))} (ray.num_cpus); lower them or run on a cluster")
    if dcfg.use_gpu and dcfg.num_workers > have.get("GPU", 0):
        raise ConfigError(
            f"decompose.use_gpu with {dcfg.num_workers} worker(s) needs {dcfg.num_workers} "
            f"GPU(s), but the local Ray has {int(have.get('GPU', 0))}")


def _interruptible_trainer_class() -> type:
    """TorchTrainer whose fit() ends with KeyboardInterrupt on Ctrl-C.

    Ray 2.60's fit() installs a SIGINT handler that aborts the controller (which stops the
    worker group) and then calls sys.exit(0); when the Ctrl-C of a terminal also reached the
    local Ray's own processes, fit() instead raises SystemExit(1) out of ray.get. Either way the
    caller cannot tell an interrupt from an exit, and the handler stays installed after fit()
    returns. This subclass replaces the handler (Ray's hook for it is a private method; where it
    is missing, `launch` still maps the SystemExit) and keeps the controller for `launch`."""
    import ray  # noqa: PLC0415
    from ray.train.torch import TorchTrainer  # noqa: PLC0415

    class InterruptibleTorchTrainer(TorchTrainer):
        controller: Any = None
        interrupted = False  # a Ctrl-C arrived during fit()
        aborted = False  # the controller was asked to stop the workers

        def _register_sigint_handler(self, controller: Any) -> None:
            self.controller = controller

            def on_sigint(signum: int, frame: Any) -> None:
                if self.interrupted:  # a second Ctrl-C: stop waiting for the workers
                    raise KeyboardInterrupt
                self.interrupted = True
                log.warning("decompose: interrupted; stopping the Ray Train workers")
                self.abort()
                raise KeyboardInterrupt

            signal.signal(signal.SIGINT, on_sigint)

        def abort(self, timeout_s: float = 60.0) -> None:
            """Ask the controller to stop the worker group (it then exits itself)."""
            if self.controller is None or self.aborted:
                return
            self.aborted = True
            try:
                ray.get(self.controller.abort.remote(), timeout=timeout_s)
            except (Exception, SystemExit) as err:
                # The controller exits inside abort() (RayActorError), or the local Ray is
                # already going down with the same Ctrl-C: nothing is left to stop then.
                log.debug("decompose: abort ended with %s: %s", type(err).__name__, err)

    return InterruptibleTorchTrainer


def _storage_failure(err: BaseException, where: UPath) -> StorageError | None:
    """The StorageError of a failed fit whose cause is a full disk or a permission problem, in
    a worker (`WorkerGroupError.worker_failures`) or in the controller writing Ray's snapshot
    (`ControllerError.controller_failure`); None for any other failure."""
    causes: list[BaseException] = [err]
    causes += [e for e in (getattr(err, "worker_failures", None) or {}).values()
               if isinstance(e, BaseException)]
    ctrl = getattr(err, "controller_failure", None)
    if isinstance(ctrl, BaseException):
        causes.append(ctrl)
    for cause in causes:
        user = storage_error(cause)
        if user is not None:
            if user.filename is None and user.errno in STORAGE_ERRNOS:
                # pyarrow (Ray's snapshot writer) names no file: name the folder it writes to.
                user = StorageError(f"{storage.url(where)}: {STORAGE_ERRNOS[user.errno]}",
                                    user.errno, storage.url(where))
            return user
    return None


def launch(cfg: RunConfig, run_dir: storage.PathLike) -> dict[str, Any]:
    """Run (or resume) the decomposition of `run_dir/target` with Ray Train.

    Returns the final metrics, the number of steps, the world size, the wall time and the step
    it resumed from (None for a fresh start). Ctrl-C ends it with KeyboardInterrupt once the
    workers are stopped; a full disk (or a permission problem) with the StorageError naming the
    file; any other failure of the workers with Ray's TrainingFailedError.

    run_dir: a local path or an fsspec URL; one only this process sees (memory://) is run on a
    local copy (`_launch_staged`)."""
    run_dir = storage.as_path(run_dir)
    if not storage.shared_across_processes(run_dir):
        return _launch_staged(cfg, run_dir)
    return _launch(cfg, run_dir)


def _launch_staged(cfg: RunConfig, run_dir: UPath) -> dict[str, Any]:
    """`_launch` on a local temporary copy of run_dir/target and run_dir/decompose (its
    checkpoints, to resume), for a run directory Ray's workers cannot see. decompose/ is copied
    back when the fit ends, also when it fails or is interrupted (so a re-run resumes), and
    files the fit removed (pruned checkpoints, things moved aside) are removed there too."""
    with tempfile.TemporaryDirectory(prefix="scalespd-decompose-") as tmp:
        local = Path(tmp) / "run"
        local.mkdir()
        for sub in ("target", "decompose"):
            src = run_dir / sub
            if src.is_dir():
                with storage.local_copy(src) as copy:
                    shutil.copytree(copy, local / sub)
        log.info("decompose: %s is seen by this process only; running on a local copy in %s",
                 storage.url(run_dir), local)
        try:
            return _launch(cfg, storage.as_path(local))
        finally:
            if (local / "decompose").is_dir():
                _sync_back(local / "decompose", decompose_dir(run_dir))


def _sync_back(src: Path, dest: UPath) -> None:
    """Make the folder `dest` hold what the local folder `src` holds."""
    storage.upload_dir(src, dest)
    root = dest.path.rstrip("/")
    # Deepest first: files and folders the fit removed (memory:// keeps empty folders).
    for found in sorted(dest.fs.find(root, withdirs=True), reverse=True):
        rel = found[len(root):].lstrip("/")
        if rel and not (src / rel).exists():
            try:
                dest.fs.rm(found, recursive=True)
            except FileNotFoundError:
                pass


def _ray_storage(run_dir: UPath) -> dict[str, Any]:
    """RunConfig's storage_path (and storage_filesystem, for a URL) for this run directory:
    Ray Train keeps its checkpoints on the run directory's own filesystem."""
    where = storage_path(run_dir)
    if storage.is_local(where):
        return {"storage_path": storage.url(where)}
    from pyarrow.fs import FSSpecHandler, PyFileSystem  # noqa: PLC0415

    return {"storage_path": where.path.rstrip("/"),
            "storage_filesystem": PyFileSystem(FSSpecHandler(where.fs))}


def _launch(cfg: RunConfig, run_dir: UPath) -> dict[str, Any]:
    import ray.train  # noqa: PLC0415

    from scalespd.raytools import ensure_ray  # noqa: PLC0415

    dcfg = cfg.decompose
    if storage.is_local(run_dir):
        run_dir = run_dir.resolve()
    storage.makedirs(decompose_dir(run_dir))
    ensure_ray(cfg.ray)
    _check_local_resources(cfg)
    cpus = dcfg.cpus_per_worker
    resume = prepare_resume(run_dir)
    log.info("decompose: Ray Train run %r (%d worker(s) x %d CPU%s) in %s, %s", RAY_RUN_NAME,
             dcfg.num_workers, cpus, " + 1 GPU" if dcfg.use_gpu else "",
             storage.url(storage_path(run_dir)),
             f"resuming from {resume[1].name}" if resume else "starting from step 0")

    loop_config: dict[str, Any] = {
        "run": cfg.model_dump(mode="json"),
        "run_dir": storage.url(run_dir),
        "threads": cpus,
        "resume": None if resume is None else {"step": resume[0],
                                               "path": storage.url(resume[1])},
    }
    trainer = _interruptible_trainer_class()(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=dcfg.num_workers,
            use_gpu=dcfg.use_gpu,
            resources_per_worker={"CPU": cpus, **({"GPU": 1} if dcfg.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=RAY_RUN_NAME,
            **_ray_storage(run_dir),
            failure_config=ray.train.FailureConfig(max_failures=dcfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=CHECKPOINTS_TO_KEEP),
        ),
    )
    on_main = threading.current_thread() is threading.main_thread()
    previous_sigint = signal.getsignal(signal.SIGINT) if on_main else None
    t0 = time.perf_counter()
    try:
        with _ProgressBar(run_dir, dcfg.steps):
            trainer.fit()
    except KeyboardInterrupt:
        trainer.abort()  # e.g. SIGTERM turned into KeyboardInterrupt by the CLI: stop workers
        raise
    except SystemExit as err:
        # Ray's Ctrl-C paths end in sys.exit (see _interruptible_trainer_class): code 0 from
        # Ray's own handler, code 1 when the local Ray went down with the same Ctrl-C.
        if trainer.interrupted or err.code == 0:
            trainer.abort()
            raise KeyboardInterrupt from err
        raise
    except ray.train.TrainingFailedError as err:
        user = _storage_failure(err, checkpoint_root(run_dir))
        if user is not None:
            raise user from err
        raise
    finally:
        if on_main and previous_sigint is not None:
            # Ray leaves its handler installed, bound to a controller that is gone.
            signal.signal(signal.SIGINT, previous_sigint)
        if not storage.is_local(run_dir):
            # The workers wrote through other processes: forget the listings fsspec cached.
            run_dir.fs.invalidate_cache()
    seconds = time.perf_counter() - t0

    meta = read_final_meta(run_dir)
    if meta is None:
        raise RuntimeError(f"Ray Train finished but {decompose_dir(run_dir) / FINAL_DIR} is "
                           f"missing (is run_dir on storage shared by all nodes?)")
    prune_untracked_checkpoints(run_dir)
    return {"steps": meta["steps"], "world_size": meta["world_size"],
            "seconds": round(seconds, 3), "metrics": meta["metrics"],
            "resumed_from_step": None if resume is None else resume[0]}
