"""Which files make up a corpus: the embedded default (CPython's standard library) or user data.

The default corpus is the standard library's Python source and text docs, present on every Python
install, so `blt train` works offline with no download. Splits are by file and derived from a hash of
the path relative to the stdlib folder, so every machine (and Python patch release) agrees on which files
are held out.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
from collections.abc import Iterable
from pathlib import Path

# Directories never taken from the stdlib: installed packages, bytecode, test suites, and the
# platform-named build folders (`config-3.11-x86_64-linux-gnu`) whose names differ between machines.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
                        "lib-dynload"})
_DEFAULT_SUFFIXES = (".py", ".txt", ".rst")


def stdlib_root() -> Path:
    """The folder the default corpus is taken from (the split and manifest names are relative to it)."""
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_description() -> str:
    return f"CPython {platform.python_version()} standard library source and docs ({stdlib_root()})"


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def default_corpus_files() -> list[Path]:
    """Non-empty `*.py`, `*.txt` and `*.rst` files of the stdlib, minus tests and packages, sorted by relative path."""
    root = stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames
                       if d not in _SKIP_DIRS and not d.startswith((".", "config-"))]
        for name in filenames:
            path = Path(dirpath) / name
            if name.endswith(_DEFAULT_SUFFIXES) and not name.startswith(".") and path.is_file() \
                    and path.stat().st_size > 0:
                files.append(path)
    if not files:
        raise ValueError(f"the default corpus is empty: no non-empty {'/'.join(_DEFAULT_SUFFIXES)} files under {root}")
    return sorted(files, key=lambda p: _rel(p, root))


def split_key(rel: str, record: int | None = None) -> float:
    """A uniform number in [0, 1) fixed by the relative path alone (a whole file), or by the path and the
    record's line or row number (one record of a JSON Lines or Parquet file); below the held-out fraction
    means held out."""
    key = rel if record is None else f"{rel}:{record}"
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_files(files: Iterable[Path], root: Path | str, heldout_fraction: float = 0.02
                ) -> tuple[list[Path], list[Path]]:
    """Deterministic (train, heldout) split by file, keyed by the path relative to `root`; both non-empty.
    Input order is kept within each split."""
    files = [Path(f) for f in files]
    heldout = heldout_indices([_rel(f, Path(root)) for f in files], heldout_fraction)
    train = [f for i, f in enumerate(files) if i not in heldout]
    return train, [f for i, f in enumerate(files) if i in heldout]


def heldout_indices(names: list[str], heldout_fraction: float = 0.02) -> set[int]:
    """Which of the files named `names` (their split keys) are held out: those whose `split_key` falls below
    the fraction, with at least one file on each side."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction}")
    if len(names) < 2:
        raise ValueError(f"need at least 2 files to hold one out for evaluation, got {len(names)}")
    keys = [split_key(n) for n in names]
    heldout = {i for i, k in enumerate(keys) if k < heldout_fraction}
    order = sorted(range(len(names)), key=lambda i: keys[i])
    if not heldout:  # a small corpus: hold out the file closest to the threshold
        heldout = {order[0]}
    elif len(heldout) == len(names):
        heldout.discard(order[-1])
    return heldout


def common_root(files: Iterable[Path]) -> Path:
    """The deepest folder holding every file (the base their manifest names are relative to)."""
    parents = [str(Path(f).resolve().parent) for f in files]
    if not parents:
        raise ValueError("no files given")
    return Path(os.path.commonpath(parents))


