"""A spy on what Ray tasks receive (test helper, not a test module): every object given to
`ray.put` and every argument of a remote call, to check that no task is handed a whole profile
matrix (issue 16)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from scalespd.graph.source import SourceSpec


class RaySpy:
    """Records `ray.put` values and remote-call arguments from its creation on (Ray functions
    made after it: the spectral stage's cached remote function is reset for that)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import ray

        from scalespd.spectral import tasks

        self.args: list[Any] = []
        real_put, real_remote = ray.put, ray.remote
        spy = self

        class Remote:
            def __init__(self, fn: Any) -> None:
                self.fn = fn

            def options(self, **kw: Any) -> Remote:
                return Remote(self.fn.options(**kw))

            def remote(self, *a: Any, **kw: Any) -> Any:
                spy.args += [*a, *kw.values()]
                return self.fn.remote(*a, **kw)

        def put(value: Any, **kw: Any) -> Any:
            spy.args.append(value)
            return real_put(value, **kw)

        def remote(*a: Any, **kw: Any) -> Any:
            if len(a) == 1 and callable(a[0]) and not kw:
                return Remote(real_remote(a[0]))
            return lambda fn: Remote(real_remote(*a, **kw)(fn))

        monkeypatch.setattr(ray, "put", put)
        monkeypatch.setattr(ray, "remote", remote)
        monkeypatch.setattr(tasks, "_remote_solve", None)

    def assert_no_matrix(self, size: int, nbytes: int, fraction: float = 0.1
                         ) -> list[SourceSpec]:
        """No argument is an array of at least `size` values or pickles to more than
        `fraction` of the matrix's `nbytes`; returns the SourceSpecs the tasks were given."""
        import ray
        from ray import cloudpickle

        assert self.args, "no Ray task ran"
        for a in self.args:
            if isinstance(a, ray.ObjectRef):
                continue  # what it refers to was recorded at ray.put
            assert not (isinstance(a, np.ndarray) and a.size >= size), a.shape
            assert len(cloudpickle.dumps(a)) < nbytes * fraction, type(a)
        return [a for a in self.args if isinstance(a, SourceSpec)]
