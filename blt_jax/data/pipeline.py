"""grain input pipeline: fixed-length windows of a prepared store, shuffled, sharded by process, batched.

Window i holds tokens [i * N, i * N + N + 1): inputs are its first N tokens and targets its last N, so
consecutive windows overlap by one token and every token of the split is a target exactly once per epoch.
Sources and transforms are top-level, picklable classes because grain spawns its worker processes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import grain
import jax
import numpy as np
from absl import flags

from blt_jax.config import ConfigError, DataConfig, PatchingConfig
from blt_jax.data.store import open_array, read_manifest, require_complete_entropies
from blt_jax.patching import patch_ids, start_flags

_DTYPES = {"tokens": np.int32, "entropies": np.float32}


def check_absl_flags() -> None:
    """Mark absl flags as parsed: grain's worker processes read a flag and fail on unparsed flags."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class WindowSource:
    """Random-access windows of seq_len + 1 tokens (and optionally entropies) from one split of a store.

    Only a finished store is read: its manifest must exist and match the arrays, and entropies must carry
    their completion mark. tensorstore handles are opened lazily in each process and dropped when pickled.
    """

    def __init__(self, root: str | os.PathLike, split: str, seq_len: int, fields: Sequence[str] = ("tokens",)):
        self.root = os.fspath(root)
        self.split = split
        self.seq_len = int(seq_len)
        self.fields = tuple(fields)
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        unknown = [f for f in self.fields if f not in _DTYPES]
        if "tokens" not in self.fields or unknown:
            raise ValueError(f"fields must include 'tokens' and be among {sorted(_DTYPES)}, got {self.fields}")
        manifest = read_manifest(self.root)
        if "entropies" in self.fields:
            require_complete_entropies(self.root, manifest)
        self._arrays: dict | None = None
        lengths = {f: a.shape[0] for f, a in self._open().items()}
        expected = manifest.get(split, {}).get("num_tokens")
        if len(set(lengths.values())) != 1 or lengths["tokens"] != expected:
            raise ValueError(f"{self.root} split {split}: array lengths {lengths} do not match the manifest's "
                             f"{expected} tokens (a damaged store: prepare it again)")
        self.num_tokens = lengths["tokens"]

    def _open(self) -> dict:
        if self._arrays is None:
            self._arrays = {f: open_array(self.root, self.split, f) for f in self.fields}
        return self._arrays

    def __len__(self) -> int:
        return max(0, (self.num_tokens - 1) // self.seq_len)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        start = index * self.seq_len
        reads = {f: a[start:start + self.seq_len + 1].read() for f, a in self._open().items()}
        return {f: r.result().astype(_DTYPES[f]) for f, r in reads.items()}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def __repr__(self) -> str:
        return (f"WindowSource(root={self.root!r}, split={self.split!r}, seq_len={self.seq_len}, "
                f"fields={self.fields!r})")


class LMWindows(grain.transforms.Map):
    """Window -> next-token LM example; trains the entropy model (a plain byte LM)."""

    fields: tuple[str, ...] = ("tokens",)

    def map(self, element: dict) -> dict[str, np.ndarray]:
        tokens = element["tokens"]
        return {"tokens": tokens[:-1], "targets": tokens[1:],
                "loss_mask": np.ones(len(tokens) - 1, np.float32)}


class PatchedWindows(grain.transforms.Map):
    """Window -> BLT example with patch-start flags; bytes past the last patch slot get no loss."""

    def __init__(self, patching: PatchingConfig, threshold: float | None = None):
        if patching.mode == "entropy" and threshold is None and patching.threshold is None:
            raise ConfigError("model.patching.threshold: entropy patching needs a threshold "
                              "(calibrate one into the data store or set it)")
        self.patching = patching
        self.threshold = threshold
        self.fields: tuple[str, ...] = ("tokens", "entropies") if patching.mode == "entropy" else ("tokens",)

    def map(self, element: dict) -> dict[str, np.ndarray]:
        tokens = element["tokens"]
        entropies = element["entropies"][None, :-1] if self.patching.mode == "entropy" else None
        starts = start_flags(self.patching, tokens[None, :-1], entropies, self.threshold)
        valid = patch_ids(starts, self.patching.max_patches).valid[0]
        return {"tokens": tokens[:-1], "targets": tokens[1:], "loss_mask": valid.astype(np.float32),
                "patch_starts": starts[0], "dropped_bytes": np.int32(np.count_nonzero(~valid))}


def _fields_of(transform: grain.transforms.Map) -> tuple[str, ...]:
    return getattr(transform, "fields", ("tokens",))


def make_train_iterator(data_cfg: DataConfig, split: str, transform: grain.transforms.Map,
                        fields: Sequence[str] | None = None, *, seed: int,
                        process_index: int | None = None, process_count: int | None = None,
                        start_step: int = 0) -> grain.DatasetIterator:
    """Endless shuffled batches of this process's share of the split (batch_size // process_count windows).

    Global step s trains on windows [s * batch_size, (s + 1) * batch_size) of one shuffled stream, process p
    taking every process_count-th of them from p: the global batches do not depend on the process count, so
    `start_step` resumes a run on any number of processes. `fields` defaults to the transform's `fields`.
    The iterator's state (get_state/set_state, or grain.checkpoint with orbax) resumes exactly when the
    process count and `data_cfg.worker_count` are unchanged.
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if data_cfg.batch_size % count:
        raise ConfigError(f"data.batch_size: {data_cfg.batch_size} is not divisible by the {count} processes")
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} out of range for {count} processes")
    source = WindowSource(data_cfg.path, split, data_cfg.seq_len, fields or _fields_of(transform))
    if len(source) == 0:
        raise ValueError(f"{source!r} has no window: the split needs at least seq_len + 1 = "
                         f"{data_cfg.seq_len + 1} tokens, it has {source.num_tokens}")
    first = start_step * data_cfg.batch_size + index
    ds = (grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)[first::count]
          .map(transform).batch(data_cfg.batch_size // count, drop_remainder=True).to_iter_dataset())
    if data_cfg.worker_count > 0:
        check_absl_flags()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.worker_count))
    return iter(ds)


def make_eval_batches(data_cfg: DataConfig, split: str, transform: grain.transforms.Map,
                      fields: Sequence[str] | None = None, num_batches: int = 1,
                      batch_size: int | None = None) -> list[dict[str, np.ndarray]]:
    """Up to `num_batches` batches of windows spread evenly over the split, in order (deterministic).

    Evenly spaced rather than leading windows, so a few batches still sample the whole held-out set.
    Fewer batches come back when the split has fewer than num_batches * batch_size windows.
    """
    batch_size = batch_size or data_cfg.batch_size
    source = WindowSource(data_cfg.path, split, data_cfg.seq_len, fields or _fields_of(transform))
    n = len(source)
    if n < batch_size:
        raise ValueError(f"{data_cfg.path}: its {split} split holds {n} window(s) of {data_cfg.seq_len + 1} tokens, "
                         f"fewer than one batch of {batch_size}; lower data.batch_size or data.seq_len, or prepare "
                         "more data (or a larger --heldout-fraction)")
    count = min(num_batches, n // batch_size) * batch_size
    indices = np.arange(count) * n // count
    batches = []
    for b in range(0, count, batch_size):
        examples = [transform.map(source[i]) for i in indices[b:b + batch_size]]
        batches.append({k: np.stack([e[k] for e in examples]) for k in examples[0]})
    return batches
