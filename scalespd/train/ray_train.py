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
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from scalespd.config import RunConfig
from scalespd.errors import STORAGE_ERRNOS, StorageError, naming_file, storage_error
from scalespd.train.io import (
    FINAL_DIR,
    META_FILE,
    MODEL_FILE,
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


def decompose_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "decompose"


def storage_path(run_dir: Path) -> Path:
    """Where Ray Train keeps this run's checkpoints (absolute: Ray requires it)."""
    return decompose_dir(run_dir).resolve() / "ray"


def checkpoint_root(run_dir: Path) -> Path:
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


def load_state(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The trainer state in checkpoint folder `path`."""
    # weights_only=False: the file is this run's own trainer state (optimizer state included).
    return torch.load(Path(path) / STATE_FILE, map_location=map_location, weights_only=False)


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint folder `path` cannot be resumed from, None when it can: its state.pt must
    load and hold the step its name says. Loading is cheap for the toy models (a few MB)."""
    step = checkpoint_step(Path(path).name)
    if step is None:
        return "not a checkpoint folder name"
    if not (Path(path) / STATE_FILE).is_file():
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


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint folder on disk, newest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p.name), p) for p in root.iterdir() if p.is_dir()]
    return sorted(((s, p) for s, p in found if s is not None), reverse=True)


def find_resume_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    """(step, folder) of the newest checkpoint on disk that can be resumed from, None if there
    is none. Newer damaged ones are logged (by path) and skipped; nothing is moved here."""
    for step, path in checkpoint_dirs(run_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            return step, path
        log.warning("decompose: checkpoint %s is damaged (%s); resuming from an earlier one",
                    path, problem)
    return None


def latest_checkpoint_step(run_dir: Path) -> int | None:
    """Step a (re)start of the decompose stage resumes from: the newest valid checkpoint on
    disk (see `find_resume_checkpoint`), None if there is none."""
    found = find_resume_checkpoint(run_dir)
    return None if found is None else found[0]


def _aside_name(path: Path) -> Path:
    """`path` renamed to `<name>.damaged-<time>` (a free name): kept for inspection, never
    deleted, and no longer a name Ray Train or the resume logic looks at."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    cand, n = path.with_name(f"{path.name}{DAMAGED_SUFFIX}{stamp}"), 1
    while cand.exists():
        n += 1
        cand = path.with_name(f"{path.name}{DAMAGED_SUFFIX}{stamp}-{n}")
    return cand


def _move_aside(path: Path) -> Path:
    dest = _aside_name(path)
    with naming_file(path):
        path.rename(dest)
    return dest


def snapshot_problem(snapshot: Path) -> str | None:
    """Why Ray Train could not start from `snapshot` (a cut or garbled file, a record of
    checkpoints that are not on disk), None if it can. Ray itself fails with an error that
    names no file and keeps failing on every later run."""
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


def _remove_staging(root: Path) -> None:
    """Checkpoints a killed run was still writing: partial by definition, and ours alone."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(STAGING_PREFIX) and p.is_dir():
            log.info("decompose: removing %s, a checkpoint a previous run did not finish", p)
            shutil.rmtree(p, ignore_errors=True)


def prepare_resume(run_dir: Path) -> tuple[int, Path] | None:
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


def snapshot_checkpoints(run_dir: Path) -> list[str] | None:
    """Checkpoint folder names Ray Train's snapshot lists, None if it cannot be read."""
    try:
        data = json.loads((checkpoint_root(run_dir) / SNAPSHOT_FILE).read_text())
        return [r["checkpoint_dir_name"] for r in data["checkpoint_results"]]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None


def prune_untracked_checkpoints(run_dir: Path) -> None:
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
            shutil.rmtree(path)


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


def _write_text(path: Path, text: str) -> None:
    with naming_file(path):
        path.write_text(text)


def write_progress(run_dir: Path, step: int, steps: int) -> None:
    """decompose/progress.json, replaced atomically (the driver may read it at any time).
    Advisory only: a write that fails (a full disk) is skipped, and the checkpoint writes
    report the storage problem."""
    path = decompose_dir(run_dir) / PROGRESS_FILE
    tmp = path.with_name(f".{PROGRESS_FILE}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"step": step, "steps": steps}))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


class _ProgressBar:
    """On a terminal, a driver-side bar of the training steps, read from progress.json once a
    second by a daemon thread while trainer.fit() runs; nothing elsewhere."""

    def __init__(self, run_dir: Path, steps: int) -> None:
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


def _staging_dir(root: Path, step: int) -> Path:
    """Where rank 0 writes the checkpoint of `step` before `_commit_checkpoint` renames it into
    place: in the checkpoint folder itself, so the commit is a rename on the same file system."""
    return root / f"{STAGING_PREFIX}{checkpoint_name(step)}-{os.getpid()}"


def _write_checkpoint_files(trainer: SPDTrainer, eval_metrics: dict[str, Any], step: int,
                            d: Path) -> None:
    """Rank 0: everything needed to resume and inspect, into the (new) folder `d`."""
    shutil.rmtree(d, ignore_errors=True)
    with naming_file(d):
        d.mkdir(parents=True)
    save_torch(trainer.state_dict(), d / STATE_FILE)
    _write_text(d / METRICS_FILE, json.dumps({"step": step, **eval_metrics}, indent=2))
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


def _write_final(trainer: SPDTrainer, cfg: RunConfig, run_dir: Path, eval_metrics: dict[str, Any],
                 world_size: int) -> None:
    """Rank 0: the finished model and metrics. `final/` appears only when complete (rename)."""
    out = decompose_dir(run_dir)
    tmp = out / f"{FINAL_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_torch(model_state(trainer.model), tmp / MODEL_FILE)
    meta = {
        "steps": trainer.step,
        "world_size": world_size,
        "target": cfg.target.model_dump(mode="json"),
        "decompose": cfg.decompose.model_dump(mode="json"),
        "metrics": eval_metrics,
    }
    _write_text(tmp / META_FILE, json.dumps(meta, indent=2))
    with naming_file(out / HEATMAP_FILE):
        trainer.save_ci_heatmap(out / HEATMAP_FILE)
    _write_text(out / METRICS_FILE, json.dumps({"step": trainer.step, **eval_metrics}, indent=2))
    final = out / FINAL_DIR
    shutil.rmtree(final, ignore_errors=True)
    tmp.replace(final)


def _log_attempt(run_dir: Path, record: dict[str, Any]) -> None:
    path = decompose_dir(run_dir) / ATTEMPTS_FILE
    with naming_file(path), path.open("a") as f:
        f.write(json.dumps(record) + "\n")


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
        return load_state(Path(resume["path"]), device), Path(resume["path"]).name
    return None, None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The body each Ray Train worker runs.

    config: {"run": RunConfig as JSON, "run_dir": str, "threads": int,
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
    run_dir = Path(config["run_dir"])
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
                            t0: float, steps_done: int, root: Path) -> dict[str, Any]:
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
    try:
        _write_checkpoint_files(trainer, eval_metrics, step, d)
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(str(d)),
                         checkpoint_dir_name=checkpoint_name(step),
                         checkpoint_upload_fn=_commit_checkpoint)
    finally:
        shutil.rmtree(d, ignore_errors=True)  # still there only if the commit did not happen
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


def _storage_failure(err: BaseException, where: Path) -> StorageError | None:
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
                user = StorageError(f"{where}: {STORAGE_ERRNOS[user.errno]}", user.errno,
                                    str(where))
            return user
    return None


def launch(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """Run (or resume) the decomposition of `run_dir/target` with Ray Train.

    Returns the final metrics, the number of steps, the world size, the wall time and the step
    it resumed from (None for a fresh start). Ctrl-C ends it with KeyboardInterrupt once the
    workers are stopped; a full disk (or a permission problem) with the StorageError naming the
    file; any other failure of the workers with Ray's TrainingFailedError."""
    import ray.train  # noqa: PLC0415

    from scalespd.raytools import ensure_ray  # noqa: PLC0415

    dcfg = cfg.decompose
    run_dir = Path(run_dir).resolve()
    decompose_dir(run_dir).mkdir(parents=True, exist_ok=True)
    ensure_ray(cfg.ray)
    _check_local_resources(cfg)
    cpus = dcfg.cpus_per_worker
    resume = prepare_resume(run_dir)
    log.info("decompose: Ray Train run %r (%d worker(s) x %d CPU%s) in %s, %s", RAY_RUN_NAME,
             dcfg.num_workers, cpus, " + 1 GPU" if dcfg.use_gpu else "", storage_path(run_dir),
             f"resuming from {resume[1].name}" if resume else "starting from step 0")

    loop_config: dict[str, Any] = {
        "run": cfg.model_dump(mode="json"),
        "run_dir": str(run_dir),
        "threads": cpus,
        "resume": None if resume is None else {"step": resume[0], "path": str(resume[1])},
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
            storage_path=str(storage_path(run_dir)),
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
    seconds = time.perf_counter() - t0

    meta = read_final_meta(run_dir)
    if meta is None:
        raise RuntimeError(f"Ray Train finished but {decompose_dir(run_dir) / FINAL_DIR} is "
                           f"missing (is run_dir on storage shared by all nodes?)")
    prune_untracked_checkpoints(run_dir)
    return {"steps": meta["steps"], "world_size": meta["world_size"],
            "seconds": round(seconds, 3), "metrics": meta["metrics"],
            "resumed_from_step": None if resume is None else resume[0]}
