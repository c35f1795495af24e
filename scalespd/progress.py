"""Progress bars for the long loops (harvest blocks, graph row blocks and passes, spectral
tasks): shown only when stderr is a terminal, so logs and CI output keep one line per event."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def on_terminal() -> bool:
    return sys.stderr.isatty()


def bar(items: Iterable[T], total: int, desc: str, unit: str) -> Iterator[T]:
    """`items`, with a tqdm bar on a terminal (nothing elsewhere)."""
    yield from tqdm(items, total=total, desc=desc, unit=unit, mininterval=1.0,
                    disable=not on_terminal(), leave=False)
