"""The prepared data store: 1-D token and entropy arrays (zarr3 via tensorstore) plus `manifest.json`.

A store root is a local folder or any tensorstore kvstore URL (`file://`, `memory://`, `gs://`, ...); all
I/O goes through tensorstore, so a bucket behaves like a folder. Layout:

    {root}/manifest.json
    {root}/{split}/tokens      uint16: per document BOS, byte + 4 ..., EOS; documents concatenated
    {root}/{split}/entropies   float32, same length: the entropy model's prediction entropy at each token

Arrays are sharded: 1M-element shards (the write unit; few objects on a bucket) of 16K-element zstd
chunks (the read unit; a random window decodes ~32 KB, not a whole shard).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import tensorstore as ts
from tqdm.auto import tqdm

from blt_jax.data.corpus import common_root
from blt_jax.tokenizer import BOE_ID, encode

FORMAT_VERSION = 1
SPLITS = ("train", "heldout")
MANIFEST = "manifest.json"
WRITE_CHUNK = 1 << 20
READ_CHUNK = 1 << 14
_FLUSH = 16 * WRITE_CHUNK

# One context per process: `memory://` stores are only visible within a shared context, and the cache
# pool keeps recently read chunks and shard indexes.
_CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 64 << 20}})


def kvstore_spec(root: str | os.PathLike, *parts: str) -> dict:
    """The tensorstore kvstore spec of `root` (a folder or a kvstore URL), joined with `parts` as a directory."""
    root = os.fspath(root)
    if "://" in root:
        spec = ts.KvStore.Spec(root).to_json()
    else:
        spec = {"driver": "file", "path": os.path.abspath(root)}
    path = spec.get("path", "")
    if path and not path.endswith("/"):
        path += "/"
    spec["path"] = path + "".join(p.strip("/") + "/" for p in parts)
    return spec


def _kvstore(root: str | os.PathLike) -> ts.KvStore:
    return ts.KvStore.open(kvstore_spec(root), context=_CONTEXT).result()


def _array_spec(root: str | os.PathLike, split: str, name: str) -> dict:
    return {"driver": "zarr3", "kvstore": kvstore_spec(root, split, name)}


# ---- manifest ---------------------------------------------------------------------------------------------

def read_manifest(root: str | os.PathLike) -> dict:
    result = _kvstore(root).read(MANIFEST).result()
    if result.state != "value":
        raise FileNotFoundError(f"no data store at {root}: {MANIFEST} is missing (prepare the data first)")
    return json.loads(result.value)


def _write_manifest(root: str | os.PathLike, manifest: dict) -> None:
    _kvstore(root).write(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode()).result()


def update_manifest(root: str | os.PathLike, **fields) -> dict:
    """Merge `fields` into the manifest's top level (e.g. a calibrated threshold) and rewrite it."""
    manifest = {**read_manifest(root), **fields}
    _write_manifest(root, manifest)
    return manifest


# ---- arrays -----------------------------------------------------------------------------------------------

def has_array(root: str | os.PathLike, split: str, name: str) -> bool:
    return _kvstore(root).read(f"{split}/{name}/zarr.json").result().state == "value"


def open_array(root: str | os.PathLike, split: str, name: str) -> ts.TensorStore:
    """A read-only handle on `{root}/{split}/{name}`."""
    try:
        return ts.open(_array_spec(root, split, name), context=_CONTEXT, open=True, read=True).result()
    except ValueError as e:
        if "NOT_FOUND" in str(e):
            raise FileNotFoundError(f"data store {root} has no array {split}/{name}") from None
        raise


def _create_array(root: str | os.PathLike, split: str, name: str, dtype: np.dtype, length: int) -> ts.TensorStore:
    return ts.open(
        _array_spec(root, split, name), context=_CONTEXT, create=True, delete_existing=True,
        dtype=ts.dtype(np.dtype(dtype).name), shape=[length],
        chunk_layout=ts.ChunkLayout(write_chunk_shape=[WRITE_CHUNK], read_chunk_shape=[READ_CHUNK]),
        codec=ts.CodecSpec({"driver": "zarr3", "codecs": [{"name": "bytes"},
                                                          {"name": "zstd", "configuration": {"level": 3}}]}),
    ).result()


def write_array(root: str | os.PathLike, split: str, name: str, array: np.ndarray) -> None:
    """Create (or overwrite) `{root}/{split}/{name}` holding the 1-D `array`."""
    array = np.asarray(array)
    if array.ndim != 1:
        raise ValueError(f"{split}/{name}: expected a 1-D array, got shape {array.shape}")
    _create_array(root, split, name, array.dtype, array.shape[0]).write(array).result()


class _StreamWriter:
    """Fills a preallocated 1-D array from pieces, writing whole shards so none is read back and rewritten."""

    def __init__(self, array: ts.TensorStore):
        self._array = array
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self._pos = 0

    def add(self, piece: np.ndarray) -> None:
        self._pending.append(piece)
        self._pending_len += len(piece)
        if self._pending_len >= _FLUSH:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        data = np.concatenate(self._pending) if self._pending else np.zeros(0, self._array.dtype.numpy_dtype)
        n = len(data) if final else len(data) // WRITE_CHUNK * WRITE_CHUNK
        end = self._pos + n
        if end > self._array.shape[0]:
            raise ValueError(f"wrote past the end of an array of length {self._array.shape[0]}")
        self._array[self._pos:end].write(data[:n]).result()
        self._pos = end
        self._pending, self._pending_len = [data[n:]], len(data) - n

    def close(self) -> None:
        self._flush(final=True)
        if self._pos != self._array.shape[0]:
            raise ValueError(f"wrote {self._pos} of {self._array.shape[0]} elements")


# ---- preparation ------------------------------------------------------------------------------------------

def _rel_name(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def _write_split(root: str | os.PathLike, split: str, files: Sequence[Path], base: Path) -> dict:
    sizes = [f.stat().st_size for f in files]
    writer = _StreamWriter(_create_array(root, split, "tokens", np.uint16, sum(sizes) + 2 * len(files)))
    for f, size in zip(files, sizes):
        data = f.read_bytes()
        if len(data) != size:
            raise ValueError(f"{f} changed size while the corpus was being prepared")
        writer.add(encode(data, bos=True, eos=True).astype(np.uint16))
    writer.close()
    return {"num_docs": len(files), "num_tokens": sum(sizes) + 2 * len(files),
            "files": [{"name": _rel_name(f, base), "bytes": s} for f, s in zip(files, sizes)]}


def prepare_tokens(root: str | os.PathLike, train_files: Iterable[Path], heldout_files: Iterable[Path],
                   base_dir: Path | str | None = None, *, description: str | None = None) -> dict:
    """Tokenize both splits into `{root}/{split}/tokens` and write a fresh manifest; returns the manifest.

    Anything previously stored under the splits (e.g. stale entropies) is deleted first, and the manifest
    is written last, so an interrupted run leaves no manifest rather than a half-valid store.
    File names in the manifest are relative to `base_dir` (default: the deepest folder holding all files).
    """
    splits = {"train": [Path(f) for f in train_files], "heldout": [Path(f) for f in heldout_files]}
    for split, files in splits.items():
        if not files:
            raise ValueError(f"cannot prepare {root}: the {split} split has no files")
    base = Path(base_dir) if base_dir is not None else common_root(splits["train"] + splits["heldout"])
    kv = _kvstore(root)
    kv.delete_range(ts.KvStore.KeyRange(MANIFEST, MANIFEST + "\0")).result()
    for split in SPLITS:
        kv.delete_range(ts.KvStore.KeyRange(f"{split}/", f"{split}0")).result()  # '0' sorts right after '/'
    manifest = {"format_version": FORMAT_VERSION, "corpus": description or f"files under {base}",
                "tokenizer": "bytes+4 (BOS=1, EOS=2)"}
    for split, files in splits.items():
        manifest[split] = _write_split(root, split, files, base)
    _write_manifest(root, manifest)
    return manifest


def compute_and_write_entropies(root: str | os.PathLike, split: str,
                                entropy_fn: Callable[[np.ndarray], np.ndarray],
                                chunk_len: int, context_len: int, batch: int = 8, progress: bool = True) -> None:
    """Write `{root}/{split}/entropies`: `entropy_fn` over the split's token stream, in fixed-shape chunks.

    Each row of a call holds up to `context_len` tokens of context followed by `chunk_len` new tokens; calls
    are always shaped (batch, context_len + chunk_len) (right-padded with BOE = 0 past the stream, so a jitted
    `entropy_fn` compiles once); only the new tokens' values are kept. This equals one pass over the whole
    stream for any causal function whose value at t depends on tokens t - context_len .. t only (e.g. a
    one-layer model with that attention window); a deeper windowed model sees at least `context_len` tokens
    of context per position.
    """
    if chunk_len < 1 or context_len < 0 or batch < 1:
        raise ValueError(f"need chunk_len >= 1, context_len >= 0, batch >= 1; got {chunk_len}, {context_len}, {batch}")
    tokens = np.asarray(open_array(root, split, "tokens").read().result()).astype(np.int32)
    n = tokens.shape[0]
    width = context_len + chunk_len
    writer = _StreamWriter(_create_array(root, split, "entropies", np.float32, n))
    starts = list(range(0, n, chunk_len))
    with tqdm(total=n, unit="tok", unit_scale=True, desc=f"entropies[{split}]", disable=not progress) as bar:
        for g in range(0, len(starts), batch):
            group = starts[g:g + batch]
            window = np.full((batch, width), BOE_ID, np.int32)
            spans = []
            for row, start in enumerate(group):
                ctx, stop = max(0, start - context_len), min(n, start + chunk_len)
                window[row, : stop - ctx] = tokens[ctx:stop]
                spans.append((start - ctx, stop - ctx))
            values = np.asarray(entropy_fn(window), dtype=np.float32)
            if values.shape != (batch, width):
                raise ValueError(f"entropy_fn returned shape {values.shape}, expected {(batch, width)}")
            for row, (a, b) in enumerate(spans):
                writer.add(values[row, a:b])
                bar.update(b - a)
    writer.close()
