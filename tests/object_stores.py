"""Run directories on fsspec filesystems for tests: `memory://` (this process only) and `s3://`
on a local S3-compatible server (moto's) bound to loopback, started by the test session."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from upath import UPath

from scalespd import storage


def files_under(root: storage.PathLike) -> dict[str, bytes]:
    """Relative path -> bytes of every file under `root`, a local folder or a URL."""
    root = storage.as_path(root)
    fs, base = root.fs, root.path.rstrip("/")
    return {full[len(base) + 1:]: fs.cat_file(full) for full in sorted(fs.find(base))}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 for the whole session, with the environment that fsspec
    (s3fs), boto and pyarrow read set to it: fake credentials, the endpoint, a region. Ray
    worker processes inherit the environment when Ray starts, so a Ray this session started
    earlier is restarted: its workers (Ray Train, harvest actors, graph tasks) must reach the
    same server, as the nodes of a cluster reach their bucket."""
    from moto.server import ThreadedMotoServer  # noqa: PLC0415

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _restart_ray()
    try:
        yield endpoint
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _restart_ray() -> None:
    import ray  # noqa: PLC0415
    from conftest import start_test_ray  # noqa: PLC0415

    if ray.is_initialized():
        ray.shutdown()
        start_test_ray()


@pytest.fixture
def s3_dir(s3_endpoint: str) -> UPath:
    """A fresh, empty s3:// folder in a fresh bucket on the session's server."""
    import fsspec  # noqa: PLC0415

    bucket = f"scalespd-{uuid.uuid4().hex[:12]}"
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(bucket)
    fs.invalidate_cache()
    return UPath(f"s3://{bucket}/run")


@pytest.fixture
def memory_dir() -> Iterator[UPath]:
    """A fresh memory:// folder, removed afterwards."""
    root = UPath(f"memory://scalespd-{uuid.uuid4().hex[:12]}/run")
    yield root
    if root.parent.exists():
        root.fs.rm(root.parent.path, recursive=True)
