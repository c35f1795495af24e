"""Streaming per-column statistics of the CI matrix, merged across row blocks in float64.

Each block of rows yields a `ColumnStats` (count, mean, M2 = sum of squared deviations, max,
number of rows above tau). Two of them merge exactly with Chan et al.'s parallel update, so the
statistics of an (M, N) matrix are computed from blocks without ever holding it. Blocks are always
merged in block order, so a resumed harvest gives the same float64 numbers as an uninterrupted one.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from scalespd import storage


@dataclass(frozen=True)
class ColumnStats:
    """Statistics of n rows of N columns.

    n: rows seen; mean, m2, max: (N,) float64; n_active: (N,) int64 rows with value > tau."""

    n: int
    mean: np.ndarray
    m2: np.ndarray
    max: np.ndarray
    n_active: np.ndarray
    tau: float

    @classmethod
    def empty(cls, n_cols: int, tau: float) -> ColumnStats:
        return cls(
            n=0,
            mean=np.zeros(n_cols),
            m2=np.zeros(n_cols),
            max=np.full(n_cols, -np.inf),
            n_active=np.zeros(n_cols, dtype=np.int64),
            tau=tau,
        )

    @classmethod
    def of(cls, x: np.ndarray, tau: float, slab: int = 256) -> ColumnStats:
        """Stats of a (rows, N) block (any float dtype; accumulated in float64, two-pass).

        Works on slabs of `slab` columns so the float64 copy stays small and cache-friendly.
        "Active" compares the stored value with tau in float64."""
        if x.ndim != 2:
            raise ValueError(f"expected a 2-D (rows, N) block, got shape {x.shape}")
        n, n_cols = x.shape
        if n == 0:
            return cls.empty(n_cols, tau)
        mean, m2 = np.empty(n_cols), np.empty(n_cols)
        n_active = np.empty(n_cols, dtype=np.int64)
        for j in range(0, n_cols, slab):
            x64 = x[:, j : j + slab].astype(np.float64)
            mu = x64.mean(axis=0)
            n_active[j : j + slab] = np.count_nonzero(x64 > tau, axis=0)
            x64 -= mu
            mean[j : j + slab] = mu
            m2[j : j + slab] = np.einsum("ij,ij->j", x64, x64)
        return cls(n=n, mean=mean, m2=m2, max=x.max(axis=0).astype(np.float64),
                   n_active=n_active, tau=tau)

    @classmethod
    def of_csr(cls, indices: np.ndarray, values: np.ndarray, n_rows: int, n_cols: int,
               tau: float) -> ColumnStats:
        """Stats of a (n_rows, n_cols) block stored as its non-zero entries: column ids
        `indices` (nnz,) and their `values` (nnz,), all > 0; every other value is 0. The same
        numbers as `of` on the dense block (up to float64 rounding), in O(nnz)."""
        if n_rows == 0:
            return cls.empty(n_cols, tau)
        v = values.astype(np.float64)
        count = np.bincount(indices, minlength=n_cols)
        mean = np.bincount(indices, weights=v, minlength=n_cols) / n_rows
        dev = v - mean[indices]
        # Two-pass M2: the stored entries' squared deviations plus the zeros' (count missing).
        m2 = np.bincount(indices, weights=dev * dev, minlength=n_cols) + (
            (n_rows - count) * mean * mean)
        top = np.zeros(n_cols)  # values are > 0, so a column's max is its largest entry or 0
        np.maximum.at(top, indices, v)
        n_active = np.bincount(indices[v > tau], minlength=n_cols).astype(np.int64)
        return cls(n=n_rows, mean=mean, m2=m2, max=top, n_active=n_active, tau=tau)

    @property
    def n_cols(self) -> int:
        return int(self.mean.shape[0])

    def merge(self, other: ColumnStats) -> ColumnStats:
        """Chan merge of two disjoint row sets: exact up to float64 rounding."""
        if self.n_cols != other.n_cols:
            raise ValueError(f"cannot merge stats of {self.n_cols} and {other.n_cols} columns")
        if self.tau != other.tau:
            raise ValueError(f"cannot merge stats computed with tau={self.tau} and {other.tau}")
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        return ColumnStats(
            n=n,
            mean=self.mean + delta * (other.n / n),
            m2=self.m2 + other.m2 + delta * delta * (self.n * other.n / n),
            max=np.maximum(self.max, other.max),
            n_active=self.n_active + other.n_active,
            tau=self.tau,
        )

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (ddof=0), (N,)."""
        if self.n == 0:
            return np.full(self.n_cols, np.nan)
        return np.sqrt(np.maximum(self.m2 / self.n, 0.0))

    @property
    def frac_active(self) -> np.ndarray:
        """Fraction of rows with value > tau, (N,)."""
        return self.n_active / max(self.n, 1)

    # ---- persistence (the per-block part of the completion record) ------------------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "n": np.asarray(self.n, dtype=np.int64),
            "mean": self.mean,
            "m2": self.m2,
            "max": self.max,
            "n_active": self.n_active,
            "tau": np.asarray(self.tau, dtype=np.float64),
        }

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> ColumnStats:
        return cls(
            n=int(a["n"]),
            mean=np.asarray(a["mean"], dtype=np.float64),
            m2=np.asarray(a["m2"], dtype=np.float64),
            max=np.asarray(a["max"], dtype=np.float64),
            n_active=np.asarray(a["n_active"], dtype=np.int64),
            tau=float(a["tau"]),
        )


def merge_all(parts: list[ColumnStats], n_cols: int, tau: float) -> ColumnStats:
    """Merge in list order (callers pass block order so the result is reproducible)."""
    total = ColumnStats.empty(n_cols, tau)
    for p in parts:
        total = total.merge(p)
    return total


def atomic_write_npz(path: storage.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Write an .npz so that `path` either does not exist or is complete (a local temporary file
    + rename, or one object on an object store: `storage.write_bytes_atomic`)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy stubs: allow_pickle
    storage.write_bytes_atomic(path, buf.getvalue())


def load_npz(path: storage.PathLike) -> dict[str, np.ndarray]:
    """Every array of the .npz at `path` (a local path or a URL), read whole."""
    p = storage.as_path(path)
    data = p.read_bytes()
    with np.load(io.BytesIO(data)) as rec:
        return {k: rec[k] for k in rec.files}
