"""The inputs of `blt prepare --data`: files, folders and glob patterns of text files and of pretraining
record files, read as a stream of documents with bounded memory.

| suffix | documents |
|---|---|
| `.jsonl` / `.ndjson`, optionally `.gz` or `.zst` | one per line: the JSON object's text field (`--text-field`) |
| `.parquet` | one per row: the text column |
| anything else (optionally `.gz` / `.zst`) | the whole file, its bytes as they are (any encoding) |

Bad records (an invalid JSON line, not an object, no text field, a non-string or null value, a string with a
lone surrogate that has no UTF-8 form) are counted and reported as `file:line` (Parquet: `file:row`), or
refused with `strict`. Records are read in chunks of about `CHUNK_BYTES` of text; text files in pieces of
that size. The readers are the well-kept ones: the standard library's json and gzip, zstandard, pyarrow.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import zstandard

from blt_jax.data import first_few

CHUNK_BYTES = 4 << 20  # text per chunk of records / per piece of a text file
PARQUET_BATCH_ROWS = 4096
_BINARY_PROBE = 8192
_MAX_EXAMPLES = 10

# name suffix -> format; the longest match wins
_FORMATS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl",
    ".jsonl.gz": "jsonl.gz", ".ndjson.gz": "jsonl.gz",
    ".jsonl.zst": "jsonl.zst", ".ndjson.zst": "jsonl.zst", ".jsonl.zstd": "jsonl.zst",
    ".parquet": "parquet",
    ".gz": "text.gz", ".zst": "text.zst", ".zstd": "text.zst",
}
RECORD_FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet")
READABLE = "text files (plain, .gz, .zst), .jsonl, .jsonl.gz, .jsonl.zst, .parquet"


def file_format(path: str | os.PathLike) -> str:
    name = Path(path).name.lower()
    matches = [s for s in _FORMATS if name.endswith(s)]
    return _FORMATS[max(matches, key=len)] if matches else "text"


@dataclass(frozen=True)
class InputFile:
    path: Path
    name: str  # relative to the corpus base (the inputs' common folder): the name in the manifest and errors
    format: str
    size: int  # bytes on disk
    mtime_ns: int
    # what the held-out split hashes: the path relative to the input (folder, file's folder or pattern) that
    # found it, so the split of a file does not depend on the other inputs of the same command
    split_name: str

    @property
    def has_records(self) -> bool:
        return self.format in RECORD_FORMATS


class SkippedBinaryFiles(UserWarning):
    """Plain files left out of the inputs as binary: a UTF-16 or UTF-32 text file is one too (NUL bytes)."""


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(_BINARY_PROBE)


def _has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _pattern_root(pattern: str) -> Path:
    """A glob pattern's leading folder, before its first wildcard."""
    fixed = []
    for part in Path(pattern).parts:
        if _has_glob(part):
            break
        fixed.append(part)
    return Path(*fixed).resolve() if fixed else Path.cwd()


def find_inputs(paths: Iterable[str | os.PathLike], exclude: str | os.PathLike | None = None) -> dict[Path, Path]:
    """Files, folders (every file below, hidden ones skipped) and glob patterns (`**` recurses) -> readable
    files (resolved, de-duplicated), each with the folder its split key is relative to (`input_files`): the
    folder given, a file's own folder, or a pattern's folder before its first wildcard; the innermost of them
    when several inputs name the file, so adding or removing other inputs never moves a file between the
    training and held-out splits. Empty files and binary plain files (a NUL in the first 8 KB) are skipped; a
    path that does not exist or is neither a file nor a folder (/dev/null), a pattern that matches nothing
    and an input with no readable file are refused.
    Files under the folder `exclude` (a store being written inside an input) are left out."""
    given = [str(p) for p in paths]
    skip = Path(exclude).resolve() if exclude is not None and "://" not in os.fspath(exclude) else None
    if not given:
        raise ValueError("no data paths given")
    found: dict[Path, Path] = {}
    binary: set[Path] = set()
    for item in given:
        p = Path(item)
        if p.is_dir():
            candidates = [f for f in p.rglob("*")
                          if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)]
            root = p.resolve()
        elif p.is_file():
            candidates, root = [p], p.resolve().parent
        elif _has_glob(item):
            candidates = [Path(m) for m in sorted(glob.glob(item, recursive=True)) if Path(m).is_file()]
            if not candidates:
                raise FileNotFoundError(f"no files match {item}")
            root = _pattern_root(item)
        elif p.exists():  # /dev/null, a pipe, a socket: there, so "does not exist" would mislead
            raise ValueError(f"data path is not a regular file or folder: {item}")
        else:
            raise FileNotFoundError(f"data path does not exist: {item}")
        if skip is not None and root.is_relative_to(skip):
            raise ValueError(f"{item}: lies inside the store folder {exclude}; keep the data and the store apart")
        for f in candidates:
            f = f.resolve()
            if skip is not None and f.is_relative_to(skip):
                continue
            if f.stat().st_size == 0:
                continue
            if file_format(f) == "text" and _is_binary(f):
                binary.add(f)
            elif f not in found or len(root.parts) > len(found[f].parts):
                found[f] = root
    if not found:
        raise ValueError(f"empty corpus: no readable files in {', '.join(given)} (empty, hidden and binary files "
                         f"are skipped; readable: {READABLE})")
    if binary:  # said, not silent: a UTF-16 text file would otherwise just be missing from the corpus
        names = sorted(str(f) for f in binary)
        warnings.warn(SkippedBinaryFiles(f"skipped {len(names)} binary file{'s' if len(names) > 1 else ''} (a NUL byte "
                                         f"in the first 8 KB; convert UTF-16/UTF-32 text to UTF-8): "
                                         f"{first_few(names)}"), stacklevel=2)
    return found


def text_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The files `find_inputs` finds (same rules: folders, files, glob patterns; hidden, empty and binary text
    files skipped), less the binary ones of any format (compressed or Parquet), sorted: for reading raw bytes."""
    paths = list(paths)
    files = sorted((f for f in find_inputs(paths) if file_format(f) == "text" or not _is_binary(f)),
                   key=lambda f: f.as_posix())  # plain text files were probed already
    if not files:
        raise ValueError(f"no text files in {', '.join(str(p) for p in paths)} (compressed and Parquet files are "
                         "binary; `blt prepare` reads their records)")
    return files


def _relative_name(f: Path, base: Path) -> str:
    """f relative to base (absolute where f lies outside it)."""
    try:
        return f.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return f.resolve().as_posix()


def input_files(files: Iterable[Path], base: Path, roots: dict[Path, Path] | None = None) -> list[InputFile]:
    """InputFiles named relative to `base`, in the given order; split keys relative to each file's root in
    `roots` (`find_inputs`), or to `base` without it."""
    out = []
    for f in files:
        name = _relative_name(f, base)
        key = name if roots is None else _relative_name(f, roots[f.resolve()])
        st = f.stat()
        out.append(InputFile(f, name, file_format(f), st.st_size, st.st_mtime_ns, key))
    return out


# ---- bad records ------------------------------------------------------------------------------------------

class BadRecordError(ValueError):
    """A bad record under `strict`."""


@dataclass
class BadRecords:
    """Counts bad records and keeps the first few as `file:line: reason`; `strict` raises on the first."""

    strict: bool = False
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, f: InputFile, number: int, reason: str) -> None:
        where = f"{f.name}:{'row ' if f.format == 'parquet' else ''}{number}"
        if self.strict:
            raise BadRecordError(f"{where}: {reason} (--strict refuses bad records; without it they are "
                                 "skipped and counted)")
        self.count += 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{where}: {reason}")


# ---- reading ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Records:
    """A chunk of documents from one record file: their bytes back to back."""

    data: np.ndarray  # uint8
    lengths: np.ndarray  # int64, bytes per document
    numbers: np.ndarray  # int64, 1-based line (JSON Lines) or row (Parquet) of each document
    empty: int = 0  # records whose text was empty (skipped, not bad)

    def select(self, keep: np.ndarray) -> Records:
        if keep.all():
            return self
        return Records(self.data[np.repeat(keep, self.lengths)], self.lengths[keep], self.numbers[keep], self.empty)


class _ZstdFrames(io.RawIOBase):
    """zstandard's decompressor over a file of one or more frames, which fails on a file that ends inside a
    frame (zstandard's own stream_reader ends there silently: a truncated file would pass as a short one)."""

    def __init__(self, raw: IO[bytes]):
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = None
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not len(self._out):
            rest = b""
            if self._frame is not None and self._frame.eof:
                rest, self._frame = self._frame.unused_data, None
            data = rest or self._raw.read(1 << 20)
            if not data:
                if self._frame is not None:
                    raise EOFError("the file ends inside a zstd frame (truncated)")
                return 0
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            self._out = memoryview(self._frame.decompress(data))
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open(f: InputFile) -> IO[bytes]:
    if f.format.endswith(".gz"):
        return gzip.open(f.path, "rb")
    if f.format.endswith(".zst"):
        return io.BufferedReader(_ZstdFrames(open(f.path, "rb")), buffer_size=1 << 20)
    return open(f.path, "rb")


def _read_errors():
    return (EOFError, OSError, zstandard.ZstdError)


def _corrupt(f: InputFile, e: Exception) -> ValueError:
    kind = {"gz": "gzip", "zst": "zstd"}.get(f.format.rsplit(".", 1)[-1], "")
    what = f"truncated or corrupt {kind} file" if kind else "unreadable file"
    return ValueError(f"{f.name}: {what} ({type(e).__name__}: {e})")


def text_pieces(f: InputFile, piece_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """A text file's bytes (decompressed), in pieces."""
    try:
        with _open(f) as fh:
            while piece := fh.read(piece_bytes):
                yield piece
    except _read_errors() as e:
        raise _corrupt(f, e) from None


def _record_text(record, text_field: str) -> tuple[bytes | None, str | None]:
    """(UTF-8 bytes, None) or (None, why the record is bad)."""
    if not isinstance(record, dict):
        return None, f"not a JSON object ({type(record).__name__})"
    if text_field not in record:
        return None, f"no {text_field!r} field"
    text = record[text_field]
    if not isinstance(text, str):
        return None, f"{text_field!r} is {'null' if text is None else type(text).__name__}, not a string"
    try:
        return text.encode("utf-8"), None
    except UnicodeEncodeError:
        return None, f"{text_field!r} holds a lone surrogate (no UTF-8 form)"


def _jsonl_records(f: InputFile, text_field: str, bad: BadRecords, chunk_bytes: int) -> Iterator[Records]:
    texts: list[bytes] = []
    numbers: list[int] = []
    size = empty = 0

    def flush():
        nonlocal texts, numbers, size, empty
        chunk = Records(np.frombuffer(b"".join(texts), np.uint8),
                        np.fromiter(map(len, texts), np.int64, len(texts)), np.asarray(numbers, np.int64), empty)
        texts, numbers, size, empty = [], [], 0, 0
        return chunk

    try:
        with _open(f) as fh:
            for number, line in enumerate(fh, 1):
                if line.isspace():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:  # also UnicodeDecodeError: bytes that are not UTF-8
                    bad.add(f, number, "invalid JSON")
                    continue
                data, why = _record_text(record, text_field)
                if why is not None:
                    bad.add(f, number, why)
                elif not data:
                    empty += 1
                else:
                    texts.append(data)
                    numbers.append(number)
                    size += len(data)
                    if size >= chunk_bytes:
                        yield flush()
    except _read_errors() as e:
        raise _corrupt(f, e) from None
    if texts or empty:
        yield flush()


def parquet_text_column(f: InputFile, text_field: str):
    """The opened ParquetFile, after checking that it has a string column `text_field`."""
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    try:
        pf = pq.ParquetFile(f.path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{f.name}: not a readable Parquet file, truncated or corrupt ({e})") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise ValueError(f"{f.name}: no column {text_field!r} (columns: {', '.join(schema.names)}); "
                         "name the text column with --text-field")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise ValueError(f"{f.name}: column {text_field!r} holds {kind}, not strings")
    return pf


def _parquet_records(f: InputFile, text_field: str, bad: BadRecords, batch_rows: int) -> Iterator[Records]:
    import pyarrow as pa  # noqa: PLC0415

    pf = parquet_text_column(f, text_field)
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=[text_field]):
            column = batch.column(0).cast(pa.large_string())
            n = len(column)
            _, offsets_buf, data_buf = column.buffers()
            offsets = np.frombuffer(offsets_buf, np.int64, n + 1, column.offset * 8)
            data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
            data = data[offsets[0]:offsets[-1]]
            lengths = np.diff(offsets)
            numbers = np.arange(row + 1, row + n + 1, dtype=np.int64)
            null = column.is_null().to_numpy(zero_copy_only=False)
            for number in numbers[null]:
                bad.add(f, int(number), f"{text_field!r} is null, not a string")
            keep = ~null & (lengths > 0)
            row += n
            yield Records(data, lengths, numbers, int(np.count_nonzero(~null & (lengths == 0)))).select(keep)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{f.name}: truncated or corrupt Parquet file ({e})") from None


def records(f: InputFile, text_field: str, bad: BadRecords, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Records]:
    """The documents of a record file, in chunks; bad records go to `bad`."""
    if f.format == "parquet":
        return _parquet_records(f, text_field, bad, PARQUET_BATCH_ROWS)
    return _jsonl_records(f, text_field, bad, chunk_bytes)
