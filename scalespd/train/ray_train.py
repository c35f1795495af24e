"""The decompose stage under Ray Train: one `TorchTrainer` run per run directory, resumable.

Layout under `run_dir/decompose/`:

    config.json                       the target + decompose config these files belong to
    ray/decompose/checkpoint_<step>/  Ray Train checkpoints: state.pt (trainer state),
                                      metrics.json (evaluate()), ci_heatmap.png
    attempts.jsonl                    one line per (re)start of the workers: start step, world size
    final/model.pt, final/meta.json   the finished SPD model (final/ appears complete or not at all)
    metrics.json, ci_heatmap.png      final decomposition metrics and CI heatmap

Resuming follows Ray Train v2: constructing the trainer again with the same
`RunConfig(name, storage_path)` makes `ray.train.get_checkpoint()` return the latest reported
checkpoint, so re-running an interrupted stage (or a worker restart under
`FailureConfig(max_failures)`) continues from that step instead of from 0.

Ray sets up the torch process group (gloo on CPU, nccl on GPU) before `train_loop_per_worker`
runs; the SPD trainer only needs its rank and world size.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from scalespd.config import RunConfig
from scalespd.train.io import FINAL_DIR, META_FILE, MODEL_FILE, model_state, read_final_meta

if TYPE_CHECKING:
    from scalespd.train.trainer import SPDTrainer

log = logging.getLogger(__name__)

RAY_RUN_NAME = "decompose"  # stable: a re-run of the same run directory resumes this Ray run
CHECKPOINTS_TO_KEEP = 3
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.json"
HEATMAP_FILE = "ci_heatmap.png"


def decompose_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "decompose"


def storage_path(run_dir: Path) -> Path:
    """Where Ray Train keeps this run's checkpoints (absolute: Ray requires it)."""
    return decompose_dir(run_dir).resolve() / "ray"


def checkpoint_root(run_dir: Path) -> Path:
    return storage_path(run_dir) / RAY_RUN_NAME


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


def _write_checkpoint_dir(trainer: SPDTrainer, eval_metrics: dict[str, Any], step: int) -> Path:
    """Rank 0: a fresh local directory holding everything needed to resume and inspect."""
    # mkdtemp, not TemporaryDirectory: Ray copies it during report() and we remove it after.
    d = Path(tempfile.mkdtemp(prefix=f"scalespd_ckpt_{step:07d}_"))
    torch.save(trainer.state_dict(), d / STATE_FILE)
    (d / METRICS_FILE).write_text(json.dumps({"step": step, **eval_metrics}, indent=2))
    trainer.save_ci_heatmap(d / HEATMAP_FILE)
    return d


def _write_final(trainer: SPDTrainer, cfg: RunConfig, run_dir: Path, eval_metrics: dict[str, Any],
                 world_size: int) -> None:
    """Rank 0: the finished model and metrics. `final/` appears only when complete (rename)."""
    out = decompose_dir(run_dir)
    tmp = out / f"{FINAL_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(model_state(trainer.model), tmp / MODEL_FILE)
    meta = {
        "steps": trainer.step,
        "world_size": world_size,
        "target": cfg.target.model_dump(mode="json"),
        "decompose": cfg.decompose.model_dump(mode="json"),
        "metrics": eval_metrics,
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    trainer.save_ci_heatmap(out / HEATMAP_FILE)
    (out / METRICS_FILE).write_text(json.dumps({"step": trainer.step, **eval_metrics}, indent=2))
    final = out / FINAL_DIR
    shutil.rmtree(final, ignore_errors=True)
    tmp.replace(final)


def _log_attempt(run_dir: Path, record: dict[str, Any]) -> None:
    with (decompose_dir(run_dir) / "attempts.jsonl").open("a") as f:
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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The body each Ray Train worker runs.

    config: {"run": RunConfig as JSON, "run_dir": str, "threads": int}.
    Every rank calls `ray.train.report` at the same steps (it is a barrier); only rank 0
    attaches checkpoints and writes files."""
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
    trainer = SPDTrainer(target, target_cfg, dcfg, device=device, rank=rank,
                         world_size=world_size)

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=False)
        trainer.load_state_dict(state)
        log.info("rank %d resumed from checkpoint at step %d", rank, trainer.step)
    else:
        trainer.faithfulness_warmup()
    if rank == 0:
        _log_attempt(run_dir, {"start_step": trainer.step, "resumed": ckpt is not None,
                               "world_size": world_size, "time": time.time()})

    eval_metrics: dict[str, Any] | None = None
    t0, steps_done = time.perf_counter(), 0
    while trainer.step < dcfg.steps:
        metrics = trainer.train_step()
        steps_done += 1
        step = trainer.step  # number of optimisation steps completed
        if step % dcfg.save_every == 0 or step == dcfg.steps:
            eval_metrics = _report_with_checkpoint(trainer, metrics, step, rank, t0, steps_done)
        elif step % dcfg.log_every == 0:
            ray.train.report(_train_metrics(metrics, step, t0, steps_done))
        if rank == 0 and step % dcfg.log_every == 0:
            log.info("decompose step %d/%d  loss %.4g  (%.1f steps/s)", step, dcfg.steps,
                     metrics.get("total", float("nan")),
                     steps_done / max(time.perf_counter() - t0, 1e-9))

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
                            t0: float, steps_done: int) -> dict[str, Any]:
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
    d = _write_checkpoint_dir(trainer, eval_metrics, step)
    try:
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(str(d)),
                         checkpoint_dir_name=f"checkpoint_{step:07d}")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return eval_metrics


# --------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------


def _check_local_resources(cfg: RunConfig) -> None:
    """On a Ray this process started itself (no cluster address), workers that cannot fit would
    make Ray Train wait for resources forever: say so instead. A real cluster may autoscale."""
    import ray  # noqa: PLC0415

    from scalespd.config import ConfigError  # noqa: PLC0415

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


def launch(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """Run (or resume) the decomposition of `run_dir/target` with Ray Train.

    Returns the final metrics, the number of steps, the world size and the wall time."""
    import ray.train  # noqa: PLC0415
    from ray.train.torch import TorchTrainer  # noqa: PLC0415

    from scalespd.raytools import ensure_ray  # noqa: PLC0415

    dcfg = cfg.decompose
    run_dir = Path(run_dir).resolve()
    decompose_dir(run_dir).mkdir(parents=True, exist_ok=True)
    ensure_ray(cfg.ray)
    _check_local_resources(cfg)
    cpus = dcfg.cpus_per_worker
    resumed = checkpoint_root(run_dir).exists()
    log.info("decompose: %s Ray Train run %r (%d worker(s) x %d CPU%s) in %s",
             "resuming" if resumed else "starting", RAY_RUN_NAME, dcfg.num_workers, cpus,
             " + 1 GPU" if dcfg.use_gpu else "", storage_path(run_dir))

    loop_config: dict[str, Any] = {
        "run": cfg.model_dump(mode="json"),
        "run_dir": str(run_dir),
        "threads": cpus,
    }
    trainer = TorchTrainer(
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
    t0 = time.perf_counter()
    trainer.fit()  # raises ray.train.TrainingFailedError when the workers fail for good
    seconds = time.perf_counter() - t0

    meta = read_final_meta(run_dir)
    if meta is None:
        raise RuntimeError(f"Ray Train finished but {decompose_dir(run_dir) / FINAL_DIR} is "
                           f"missing (is run_dir on storage shared by all nodes?)")
    return {"steps": meta["steps"], "world_size": meta["world_size"],
            "seconds": round(seconds, 3), "metrics": meta["metrics"]}


def latest_checkpoint_step(run_dir: Path) -> int | None:
    """Step of the newest checkpoint Ray Train has committed for this run (what a restart
    resumes from), None if there is none. Reads Ray's checkpoint-manager snapshot."""
    snap = checkpoint_root(run_dir) / "checkpoint_manager_snapshot.json"
    try:
        results = json.loads(snap.read_text())["checkpoint_results"]
        steps = [int(r["checkpoint_dir_name"].rsplit("_", 1)[-1]) for r in results]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return max(steps, default=None)
