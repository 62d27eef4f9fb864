"""Bulk generation: a continuous batcher over the engine, and JSON Lines files of prompts through it.

`ContinuousBatcher` keeps one live batch of B rows (a `samplers.Carry`) on the device. When a row ends (EOS or
its budget), its bytes are read and the next waiting prompt is prefilled into that row's slot
(`samplers.insert_rows`), so the batch stays full instead of waiting for its slowest row. Rows carry their own
budget, sampling settings and key data, and the shapes are fixed for the whole run (one buffer of S positions per
row, a few prompt buckets), so nothing recompiles as prompts come and go. A prompt with seed s gets the key data
of row 0 of `api.generate(model, [prompt], seed=s)`, so its bytes equal that call's.

`generate_file` streams records (`{"id", "prompt"}` plus optional `max_new_bytes`, `temperature`, `top_k`,
`top_p`, `seed`) from a JSON Lines file or stdin through one batcher and writes one line per record as it
finishes (or in input order): memory does not depend on the number of records, apart from their ids and
indices (kept to skip finished records on a rerun, to catch duplicates, and to put a resumed output back in
input order). A rerun continues an output only if it is this command's own (its lines and settings file,
checked before anything changes), skips its generated records and generates its error lines' records again.
Under `jax.distributed` each process takes the records whose index is its process index modulo the process
count, writes them to its own part file, and process 0 merges the parts into the output in input order. The
parts a killed job left are merged into the output before a rerun starts, whatever the two runs' process
counts (one included), so their records are neither generated again nor left behind. One run at a time
writes an output (a lock next to it): a second is refused while the first runs.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import difflib
import fcntl
import functools
import hashlib
import heapq
import json
import os
import re
import stat
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from blt_jax.generation import constants, programs, samplers
from blt_jax.generation.api import cost_record
from blt_jax.generation.cost import ParamsForCost
from blt_jax.generation.loaded import LoadedModel
from blt_jax.generation.samplers import Carry, MethodConfig
from blt_jax.generation.sampling import (TEMPERATURE_RULE, TOP_P_RULE, SamplingConfig, SamplingRows, row_keys,
                                        temperature_ok, top_p_ok)
from blt_jax.tokenizer import BOE_ID, EOS_ID, decode_bytes, encode

DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_POSITIONS = 2048
MAX_POSITIONS = constants.LENGTH_BUCKETS[-1]  # api.generate's limit (its longest bucket), for every way to generate
SMALLEST_PROMPT_BUCKET = 64
END = object()  # what a request source returns when it has no more requests


# ---- the continuous batcher -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _OneLayout(MethodConfig):
    """`method` with one engine-state shape for every prompt bucket up to `largest_prompt`.

    An engine state's ring sizes follow the prefill chunk (`MethodConfig.layout`), so a short prompt's prefill
    would make a carry of another shape than a long one's, and `insert_rows` needs equal shapes. Sizing every
    state for the largest bucket's chunk lets short prompts still prefill in short chunks (the ring sizes are
    bookkeeping: values are the same whatever their size)."""

    largest_prompt: int = samplers.PREFILL_CHUNK

    def layout(self, buffer: int, prompt_len: int):
        return super().layout(buffer, max(prompt_len, self.largest_prompt))


def check_max_positions(max_positions: int) -> None:
    """Refuse rows longer than generation supports before anything is allocated or written: a probe's
    --max-positions 100000000 compiled and allocated for minutes, or ran out of memory, without a word."""
    if max_positions > MAX_POSITIONS:
        raise ValueError(f"--max-positions {max_positions}: more than the {MAX_POSITIONS} positions generation "
                         "supports per row (prompt + max_new_bytes + the method's lookahead)")


def prompt_buckets(largest: int) -> tuple[int, ...]:
    """Prompt buckets (positions, BOS included) up to `largest`: 64, 128, 256, ... then `largest` itself. A
    prefill runs in chunks of min(bucket, 256) positions, so doubling keeps padding under half the work."""
    buckets = []
    b = SMALLEST_PROMPT_BUCKET
    while b < largest:
        buckets.append(b)
        b *= 2
    return tuple(buckets) + (largest,)


@dataclass
class Request:
    """One prompt for the batcher. `key`: its random key data (`sampling.row_keys(seed, 1)[0]` reproduces
    `api.generate(..., seed=seed)`); `on_bytes`: called with new bytes as they are committed (streaming);
    `cancelled`: set it (from any thread) to free the row at the next host step."""

    ids: np.ndarray  # BOS + the prompt's byte ids (int32)
    budget: int
    sampling: SamplingConfig
    key: np.ndarray  # (2,) uint32
    tag: Any = None
    on_bytes: Optional[Callable[[bytes], None]] = None
    cancelled: bool = False


@dataclass
class Finished:
    request: Request
    ids: np.ndarray  # the generated ids (EOS included when the row stopped there)
    counts: dict  # the row's cost counters (`api.cost_record`'s input)

    @property
    def new_bytes(self) -> bytes:
        return decode_bytes(self.ids)

    @property
    def finish_reason(self) -> str:
        """OpenAI's names: "stop" (the model emitted EOS) or "length" (the budget ran out)."""
        return "stop" if len(self.ids) and int(self.ids[-1]) == EOS_ID else "length"


@dataclass
class _Live:
    request: Request
    emitted: int  # tokens already passed to on_bytes (counted from the row's start)


@functools.partial(jax.jit, static_argnums=(1,))
def _empty_batch(one: Carry, rows: int) -> Carry:
    """A live batch of `rows` slots, each a copy of the one-row carry `one` with no budget (done): the slots
    wait for prompts."""
    batch = jax.tree.map(lambda a: jnp.repeat(a, rows, axis=0), one)
    return batch._replace(budget=jnp.zeros_like(batch.budget))


@functools.partial(jax.jit, donate_argnums=(0,))
def _retire(carry: Carry, slot) -> Carry:
    """Take a row out of the running (its budget to 0: done), e.g. when its client went away."""
    return carry._replace(budget=carry.budget.at[slot].set(0))


@jax.jit
def _row(tokens, slot):
    return tokens[slot]


def _greedy_rows(batch: int) -> SamplingRows:
    return SamplingRows(jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.int32),
                        jnp.ones((batch,), jnp.float32))


class ContinuousBatcher:
    """B rows of one method on one device, refilled as rows finish.

    The live batch starts greedy (its sampler compiles to an argmax); the first request that samples turns
    it into a batch with per-row settings (greedy rows keep temperature 0, so their bytes do not change), which
    compiles the loop once more (`sampled=True` starts there). `rounds_per_call` bounds the rounds between host
    steps (None: run until some row finishes); a server bounds it so new requests, cancellations and streamed
    bytes are seen promptly."""

    def __init__(self, model: LoadedModel, method: MethodConfig, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_positions: int = DEFAULT_MAX_POSITIONS, stop_at_eos: bool = True, allow_specials: bool = False,
                 sampled: bool = False, rounds_per_call: Optional[int] = None):
        if model.mesh is not None:
            raise ValueError("bulk generation runs each process's live batch on one device; load the model "
                             "without a mesh (under jax.distributed every process takes its own share)")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        check_max_positions(max_positions)
        self.largest_prompt = max_positions - method.lookahead - 1  # leave room for at least one new byte
        if self.largest_prompt < 2:
            raise ValueError(f"max_positions: {max_positions} positions leave no room for a prompt and a byte with "
                             f"method {method.method!r} (it needs {method.lookahead} positions past the text)")
        self.model = model
        self.method = _OneLayout(**{f.name: getattr(method, f.name) for f in dataclasses.fields(MethodConfig)},
                                 largest_prompt=self.largest_prompt)
        self.batch_size = batch_size
        self.max_positions = max_positions
        self.buckets = prompt_buckets(self.largest_prompt)
        self.stop_at_eos = stop_at_eos
        self.allow_specials = allow_specials
        self.rounds_per_call = rounds_per_call or int(jnp.iinfo(jnp.int32).max)
        self.sampled = sampled  # the live batch carries per-row sampling settings
        self.peak_rows = 0  # the most rows that ran at once (batches are shared: a server's clients see it)
        self._prefilled: set[int] = set()  # prompt buckets compiled since programs.frees was _frees_seen
        self._frees_seen = programs.frees

    def positions_needed(self, prompt_ids: int, budget: int) -> int:
        """Positions a row takes: its ids (BOS + prompt), the budget and the method's lookahead."""
        return prompt_ids + budget + self.method.lookahead

    def refusal(self, prompt_ids: int, budget: int) -> Optional[str]:
        """Why a prompt of `prompt_ids` ids (BOS included) with `budget` cannot run here, or None."""
        if budget < 1:
            return f"max_new_bytes: must be >= 1, got {budget}"
        need = self.positions_needed(prompt_ids, budget)
        if need > self.max_positions:
            return (f"the prompt ({prompt_ids - 1} bytes) and max_new_bytes={budget} need {need} positions with method "
                    f"{self.method.method!r}, more than the {self.max_positions} this run holds per row "
                    f"(--max-positions)")
        return None

    # -- device steps --

    def _prefill(self, req: Request) -> Carry:
        n = len(req.ids)
        tokens = np.full((1, self.max_positions), BOE_ID, np.int32)
        tokens[0, :n] = req.ids
        rows = SamplingRows.of([req.sampling]) if self.sampled else None
        bucket = next(b for b in self.buckets if b >= n)
        if self._frees_seen != programs.frees:  # every program was freed: each bucket compiles again
            self._prefilled, self._frees_seen = set(), programs.frees
        if bucket not in self._prefilled:  # a compile may follow (the loop's too, on the first admission)
            programs.make_room()
            self._prefilled.add(bucket)
        return samplers.prefill(self.model.spec, self.method, self.model.all_params(), jnp.asarray(tokens),
                                jnp.asarray([n], jnp.int32), jnp.asarray([req.budget], jnp.int32),
                                jnp.asarray(req.key[None], jnp.uint32), rows, prompt_len=bucket)

    def _admit(self, carry: Optional[Carry], slot: int, req: Request) -> Carry:
        if req.sampling.allow_specials != self.allow_specials:
            raise ValueError("sampling.allow_specials: must be the same for every request of a batcher")
        if self.refusal(len(req.ids), req.budget):
            raise ValueError(self.refusal(len(req.ids), req.budget))
        if not req.sampling.greedy and not self.sampled:
            self.sampled = True
            if carry is not None:
                carry = carry._replace(sampling=_greedy_rows(self.batch_size))
        one = self._prefill(req)
        if carry is None:
            carry = _empty_batch(one, self.batch_size)
        return samplers.insert_rows(carry, jnp.asarray([slot], jnp.int32), one)

    def _advance(self, carry: Carry) -> Carry:
        return samplers.advance(self.model.spec, self.method, self.model.all_params(), carry, self.rounds_per_call,
                                allow_specials=self.allow_specials, stop_at_eos=self.stop_at_eos,
                                exit_on_finish=True)

    def _new_ids(self, carry: Carry, slot: int, start: int, begin: int, end: int) -> np.ndarray:
        return np.asarray(_row(carry.state.tokens, slot))[start + begin:start + end]

    # -- the loop --

    def run(self, next_request: Callable[[bool], Any]) -> Iterator[Finished]:
        """Generate for every request `next_request(wait)` hands out, yielding each as it finishes.

        `next_request(wait)` returns a Request, None (nothing waiting now) or END (no more, ever); it is asked
        whenever a slot is free, with wait=True when nothing is running (it may then block until a request
        comes). A cancelled request's row is dropped without a result."""
        carry: Optional[Carry] = None
        live: dict[int, _Live] = {}
        free = list(range(self.batch_size))[::-1]
        exhausted = False
        while True:
            while free and not exhausted:
                req = next_request(not live)
                if req is END:
                    exhausted = True
                elif req is None:
                    break
                elif not req.cancelled:
                    slot = free.pop()
                    carry = self._admit(carry, slot, req)
                    live[slot] = _Live(req, 0)
            for slot in [s for s, lv in live.items() if lv.request.cancelled]:
                carry = _retire(carry, slot)
                del live[slot]
                free.append(slot)
            if not live:
                if exhausted:
                    return
                continue
            self.peak_rows = max(self.peak_rows, len(live))
            carry = self._advance(carry)
            length, start, budget, ended = jax.device_get((carry.state.length, carry.start, carry.budget, carry.ended))
            done = ended | (length - start >= budget)
            finished = [slot for slot in live if done[slot]]
            counters = jax.device_get(carry.state.counters) if finished else None
            for slot, lv in live.items():
                made = int(length[slot] - start[slot])
                if lv.request.on_bytes is not None and made > lv.emitted:
                    lv.request.on_bytes(decode_bytes(self._new_ids(carry, slot, int(start[slot]), lv.emitted, made)))
                    lv.emitted = made
            for slot in finished:
                lv = live.pop(slot)
                free.append(slot)
                ids = self._new_ids(carry, slot, int(start[slot]), 0, int(length[slot] - start[slot]))
                yield Finished(lv.request, ids, {k: int(v[slot]) for k, v in counters.items()})


@functools.lru_cache(maxsize=1024)
def request_key(seed: int, row: int = 0) -> np.ndarray:
    """The key data `api.generate(..., seed=seed)` gives its row `row`."""
    return row_keys(seed, 1, first_row=row)[0]


def cost_of(finished: Finished, method: str, params: ParamsForCost) -> dict:
    """`api.cost_record` of a finished row, without wall time (a row's time is shared with its batch, and an
    output without it is the same on every run)."""
    cost = cost_record(method, finished.counts, len(finished.ids), params, 0.0)
    cost.pop("seconds")
    return cost


# ---- JSON Lines records -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Defaults:
    """What a record gets for the fields it leaves out."""

    max_new_bytes: int = 128
    sampling: SamplingConfig = SamplingConfig()
    seed: int = constants.SEED


class RecordError(ValueError):
    """A record that cannot be generated: it gets an error line of its own, the run goes on."""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


RECORD_FIELDS = ("id", "prompt", "max_new_bytes", "temperature", "top_k", "top_p", "seed")
_OTHER_NAMES = {"max_tokens": "max_new_bytes"}  # the server's (OpenAI's) name for it


def misspelt_field(key: str, fields: Sequence[str], other_names: Optional[dict] = None) -> Optional[str]:
    """The error for a key that is a near miss of one of `fields` (or another program's name for one), which
    would otherwise be ignored and leave the setting at its default; None for a field, or for any other key
    (the user's metadata)."""
    if key in fields:
        return None
    near = [other_names[key]] if other_names and key in other_names else difflib.get_close_matches(key, fields, 1, 0.8)
    return f"{key}: not a field; did you mean {near[0]}?" if near else None


def record_settings(rec: dict, defaults: Defaults) -> tuple[bytes, int, SamplingConfig, int]:
    """(prompt bytes, budget, sampling, seed) of a record, or RecordError naming the bad field. Other fields
    are the user's (metadata) and ignored, except near-misses of a setting's name: a typo would otherwise run
    the record with the default silently."""
    for key in rec:
        # id, prompt and seed are never suggested: idx, prompt_id and speed are the user's own fields
        if key not in RECORD_FIELDS and (error := misspelt_field(key, RECORD_FIELDS[2:6], _OTHER_NAMES)):
            raise RecordError(error)
    prompt = rec.get("prompt")
    if not isinstance(prompt, str):
        raise RecordError("prompt: missing" if prompt is None else f"prompt: must be a string, got {prompt!r:.40}")
    try:
        data = prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise RecordError("prompt: holds a lone surrogate (\\ud800-\\udfff), which has no UTF-8 form") from None
    if not data:
        raise RecordError("prompt: is empty; give at least one byte")
    budget = rec.get("max_new_bytes", defaults.max_new_bytes)
    if not _is_int(budget) or budget < 1:
        raise RecordError(f"max_new_bytes: must be an integer >= 1, got {budget!r}")
    s = defaults.sampling
    temperature, top_k, top_p = (rec.get("temperature", s.temperature), rec.get("top_k", s.top_k),
                                 rec.get("top_p", s.top_p))
    if not _is_number(temperature) or not temperature_ok(temperature):
        raise RecordError(f"temperature: {TEMPERATURE_RULE}, got {temperature!r}")
    if not _is_int(top_k) or top_k < 0:
        raise RecordError(f"top_k: must be an integer >= 0, got {top_k!r}")
    if not _is_number(top_p) or not top_p_ok(top_p):
        raise RecordError(f"top_p: {TOP_P_RULE}, got {top_p!r}")
    seed = rec.get("seed", defaults.seed)
    if not _is_int(seed) or not -2**63 <= seed < 2**63:
        raise RecordError(f"seed: must be an integer in [-2**63, 2**63), got {seed!r}")
    return data, budget, dataclasses.replace(s, temperature=float(temperature), top_k=top_k, top_p=float(top_p)), seed


def result_line(id_: Any, finished: Finished, method: str, params: ParamsForCost) -> dict:
    """The output record of a finished row. `text` is the new bytes as UTF-8; when they are not valid UTF-8 (a
    byte model may stop inside a character) `text` has U+FFFD there and `bytes_b64` holds the exact bytes."""
    new = finished.new_bytes
    out: dict = {"id": id_}
    try:
        out["text"] = new.decode("utf-8")
    except UnicodeDecodeError:
        out["text"] = new.decode("utf-8", errors="replace")
        out["bytes_b64"] = base64.b64encode(new).decode("ascii")
    out["finish_reason"] = finished.finish_reason
    out["cost"] = cost_of(finished, method, params)
    return out


def _dumps(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _id_key(id_: Any) -> tuple:
    return ("id", json.dumps(id_))


def _usable_id(id_: Any) -> bool:
    return isinstance(id_, str) or _is_int(id_)


def _done_key(rec: dict) -> tuple:
    """What names an output line's record: its id, or for a record that had no usable id (or a repeated one)
    its input line."""
    if "error" in rec and "line" in rec:
        return ("line", rec["line"])
    return _id_key(rec["id"])


def _split_part_line(line: str) -> tuple[int, str]:
    """A part file's line -> (input index, the output line); ValueError when it is not one."""
    index, tab, rest = line.partition("\t")
    if not (tab and index.isascii() and index.isdigit()):
        raise ValueError(f"not a part file line: {line[:40]!r}")
    return int(index), rest


_RESULT_FIELDS = {"id", "text", "finish_reason", "cost"}  # plus bytes_b64 (result_line)
_RECORD_START = b'{"id": '  # how every line the writer emits begins (json.dumps of a dict whose first key is id)


def _line_kind(rec: Any) -> Optional[str]:
    """"result" for a generated record's line (`result_line`), "error" for an error line, exactly as
    `generate_file` writes them; None for anything else (another tool's JSON, a prompts file)."""
    if not isinstance(rec, dict) or "id" not in rec:
        return None
    if "error" in rec:
        if not isinstance(rec["error"], str):
            return None
        if set(rec) == {"id", "error"}:
            return "error" if _usable_id(rec["id"]) else None
        ok = set(rec) == {"id", "line", "error"} and _is_int(rec["line"]) and rec["line"] >= 1
        return "error" if ok else None
    if set(rec) - {"bytes_b64"} != _RESULT_FIELDS or not _usable_id(rec["id"]):
        return None
    if not (isinstance(rec["text"], str) and rec["finish_reason"] in ("stop", "length")
            and isinstance(rec["cost"], dict) and isinstance(rec.get("bytes_b64", ""), str)):
        return None
    return "result"


def _parse_line(raw: bytes, indexed: bool) -> tuple[Optional[str], Any]:
    """(kind, record) of a complete output (or part) line; kind None when the writer did not write it."""
    try:
        text = raw.decode("utf-8")
        if indexed:
            text = _split_part_line(text)[1]
        rec = json.loads(text)
    except ValueError:  # not a part line, UnicodeDecodeError and JSONDecodeError alike
        return None, None
    return _line_kind(rec), rec


def _could_start_a_record(raw: bytes, indexed: bool) -> bool:
    """Whether a cut-off last line is the start of a line the writer emits (a killed run's half record), not
    the end of someone's file that merely lacks its newline."""
    if indexed:
        digits = len(raw) - len(raw.lstrip(b"0123456789"))
        if digits == 0 or digits == len(raw):
            return digits > 0
        if raw[digits:digits + 1] != b"\t":
            return False
        raw = raw[digits + 1:]
    return raw.startswith(_RECORD_START) or _RECORD_START.startswith(raw)


@dataclass
class _Scan:
    """What an existing output (or part) file holds; see `_scan`."""

    path: Path
    indexed: bool  # a part file: "index<TAB>line" lines
    size: int = 0
    done: set = dataclasses.field(default_factory=set)  # keys of generated records: a rerun skips them
    failed: set = dataclasses.field(default_factory=set)  # keys of records with an error line: generated again
    error_lines: int = 0
    repeated: int = 0  # generated records' lines after their first (two runs wrote the file at once)
    cut_off: bool = False  # the last line lacks its newline: half a record a killed run was writing


def _foreign(path: Path, number: int) -> ValueError:
    return ValueError(f"{path}:{number}: not a record written by `blt generate --input`; refusing to add to this "
                      "file (choose another --output)")


def _scan(path: Path, indexed: bool) -> _Scan:
    """Read an output (or part) file without changing it; ValueError naming the first line `generate_file`
    would not have written (a foreign file must be refused before anything in it is repaired or added to)."""
    scan = _Scan(path, indexed)
    if not path.exists():
        return scan
    if path.is_dir():
        raise IsADirectoryError(f"--output {path}: is a folder; give a file")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            scan.size += len(raw)
            if not raw.endswith(b"\n"):
                if not _could_start_a_record(raw, indexed):
                    raise _foreign(path, number)
                scan.cut_off = True
                break
            kind, rec = _parse_line(raw, indexed)
            if kind is None:
                raise _foreign(path, number)
            if kind == "result":
                scan.repeated += _done_key(rec) in scan.done
                scan.done.add(_done_key(rec))
            else:
                scan.error_lines += 1
                scan.failed.add(_done_key(rec))
    scan.failed -= scan.done
    return scan


def _sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (where the OS lets a folder be opened and synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rewrite(path: Path, lines: Iterable[bytes]) -> None:
    """Replace `path` by `lines` atomically: a crash leaves the old file or the new one, never a mix. The temp
    file's name starts with a dot, so `_parts`' pattern never takes it for a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for line in lines:
                f.write(line)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def _results_only(path: Path, indexed: bool) -> Iterator[bytes]:
    """The complete lines of a scanned file that are generated records, each record's first only (error lines,
    repeats and a cut-off line left out)."""
    seen = set()
    with open(path, "rb") as f:
        for raw in f:
            kind, rec = _parse_line(raw, indexed) if raw.endswith(b"\n") else (None, None)
            if kind == "result" and _done_key(rec) not in seen:
                seen.add(_done_key(rec))
                yield raw


def _repair(scan: _Scan) -> None:
    """Make a scanned file ready to be appended to: drop its error lines (their records are generated again,
    and the output keeps one line per record), repeated lines and a cut-off last line."""
    if scan.cut_off:
        print(f"blt generate: {scan.path}: dropped a cut-off last line (a record a killed run was writing; it is "
              "generated again)", file=sys.stderr)
    if scan.repeated:  # as merging parts does, a record keeps its first line
        print(f"blt generate: {scan.path}: dropped {scan.repeated} repeated lines (records written twice, as two "
              "runs at once did; each keeps its first line)", file=sys.stderr)
    if scan.error_lines or scan.repeated:
        _rewrite(scan.path, _results_only(scan.path, scan.indexed))
    elif scan.cut_off:
        drop_cut_off_line(scan.path)


def _in_input_order(path: Path, index_of: dict) -> bool:
    """Rewrite an output in input order if it is not (it is when one run wrote it with --ordered; a resumed
    run appends its records, retried ones included, after the earlier ones). Returns whether it rewrote it.
    Memory: three integers a line; the lines are copied one at a time."""
    where, offsets, sizes = array("q"), array("q"), array("q")
    last, ordered, offset = -1, True, 0
    with open(path, "rb") as f:
        for raw in f:
            # a record the input no longer holds stays right after the line before it
            index = index_of.get(_done_key(json.loads(raw)), last)
            ordered &= index >= last
            where.append(index)
            offsets.append(offset)
            sizes.append(len(raw))
            last, offset = index, offset + len(raw)
    if ordered:
        return False
    order = np.lexsort((np.frombuffer(offsets, np.int64), np.frombuffer(where, np.int64)))

    def lines():
        with open(path, "rb") as f:
            for i in order:
                f.seek(offsets[i])
                yield f.read(sizes[i])

    _rewrite(path, lines())
    return True


def drop_cut_off_line(path: Path) -> bool:
    """Truncate a file to its last complete line (a killed run may have left half a line): that half holds no
    finished record, and records appended after it would be unreadable. Returns whether it did."""
    if not path.exists():
        return False
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return False
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return False
        keep = 0
        block = 1 << 16
        pos = size
        while pos > 0:  # find the last newline, reading backwards
            pos = max(0, pos - block)
            f.seek(pos)
            chunk = f.read(min(block, size - pos))
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = pos + nl + 1
                break
        f.truncate(keep)
    return True


class _Writer:
    """Writes each record's output line as it comes, or (ordered) in input order. Every record index is put
    exactly once; None means the record has no line here (already done, or another process's)."""

    def __init__(self, f: TextIO, ordered: bool, indexed: bool):
        self.f, self.ordered, self.indexed = f, ordered, indexed
        self.next_index = 0
        self.pending: dict[int, Optional[str]] = {}

    def put(self, index: int, line: Optional[str]) -> None:
        if not self.ordered:
            self._write(index, line)
            return
        self.pending[index] = line
        while self.next_index in self.pending:
            self._write(self.next_index, self.pending.pop(self.next_index))
            self.next_index += 1

    def _write(self, index: int, line: Optional[str]) -> None:
        if line is None:
            return
        self.f.write(f"{index}\t{line}\n" if self.indexed else line + "\n")
        self.f.flush()  # a finished record reaches the file now: a killed run loses only rows in flight


def _records(source) -> Iterator[tuple[int, int, bytes]]:
    """(record index, line number in the file, text) of every non-blank line: records are numbered from 0."""
    index = 0
    for number, raw in enumerate(source, 1):
        if raw.strip():
            yield index, number, raw
            index += 1


def _count_records(path: str) -> Optional[int]:
    """For the progress bar; None for a stream (stdin, a pipe, `<(...)`), which can be read only once."""
    if path == "-" or not Path(path).is_file():
        return None
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _open_input(path: str):
    if path == "-":
        return sys.stdin.buffer
    if not Path(path).exists():
        raise FileNotFoundError(f"--input {path}: no such file")
    if Path(path).is_dir():
        raise IsADirectoryError(f"--input {path}: is a folder; give a JSON Lines file")
    return open(path, "rb")


def _barrier(name: str) -> None:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    multihost_utils.sync_global_devices(name)


def part_path(output: Path, process: int, processes: int) -> Path:
    return output.with_name(f"{output.name}.part-{process:05d}-of-{processes:05d}")


def _parts(output: Path) -> list[Path]:
    """The part files of `output`: exactly the names `part_path` gives (a user's `.bak` copy of one is not)."""
    name = re.compile(re.escape(output.name) + r"\.part-\d{5}-of-\d{5}")
    return sorted(p for p in output.parent.glob(f"{output.name}.part-*-of-*") if name.fullmatch(p.name))


def _merge_parts(output: Path, already: set) -> int:
    """Append the parts' lines to `output` in input order (each part is in input order: a streaming merge),
    leaving out records `output` already held and repeats (two jobs' parts may hold one record), then delete
    the parts. Returns the lines appended."""
    parts = _parts(output)
    files = [open(p, encoding="utf-8") for p in parts]
    appended = set()
    try:
        lines = heapq.merge(*[(_split_part_line(line.rstrip("\n")) for line in f if line.endswith("\n"))
                              for f in files], key=lambda item: item[0])
        with open(output, "a", encoding="utf-8") as out:
            for _, text in lines:
                key = _done_key(json.loads(text))
                if key not in already and key not in appended:
                    out.write(text + "\n")
                    appended.add(key)
            out.flush()
            os.fsync(out.fileno())
    finally:
        for f in files:
            f.close()
    for p in parts:
        p.unlink()
    return len(appended)


@dataclass
class _Tally:
    records: int = 0  # this process's records seen in the input
    generated: int = 0
    errors: int = 0
    skipped: int = 0  # already in the output
    retried: int = 0  # had an error line in the output: generated again (counted in generated or errors too)
    new_bytes: int = 0


def weights_digest(model: LoadedModel) -> str:
    """A short digest of the model's small weights (norm scales and the like; their dtype too): every training
    step changes them, so two checkpoints of a run, or a float32 and a bfloat16 load, differ."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(model.all_params()):
        if leaf.size <= 4096:
            a = np.asarray(leaf)
            digest.update(f"{a.dtype}{a.shape}".encode() + a.tobytes())
    return digest.hexdigest()[:16]


def output_settings(model: LoadedModel, method: samplers.MethodConfig, defaults: Defaults, stop_at_eos: bool) -> dict:
    """What decides an output's records besides the records themselves (the weights and their dtype, the
    method's options that apply to it, the flags' defaults): a resumed run must use the same, or its records
    would mix with others."""
    floats = {str(a.dtype) for a in jax.tree.leaves(model.all_params()) if jnp.issubdtype(a.dtype, jnp.floating)}
    m = {"weights": weights_digest(model), "dtype": ",".join(sorted(floats)), "method": method.method}
    if method.method == "s":
        m["draft_len"] = method.draft_len
    if method.method in ("d", "dv"):
        m.update(block_size=method.block_size, unmask=dataclasses.asdict(method.unmask))
    return json.loads(json.dumps({**m, "max_new_bytes": defaults.max_new_bytes, "seed": defaults.seed,
                                  "sampling": dataclasses.asdict(defaults.sampling), "stop_at_eos": stop_at_eos}))


def settings_path(output: Path) -> Path:
    return output.with_name(output.name + ".settings.json")


def lock_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.lock")


@contextlib.contextmanager
def _exclusive(output: Path) -> Iterator[None]:
    """Hold `output` for one run: two at once each generated every record into it (each line twice, for good).
    An advisory lock (flock, as `checkpoint.exclusive` holds a training run) on a file next to it, which the
    OS drops when the process dies; a run that ends removes the file (one a killed run left is reused), so a
    refused or finished run leaves the folder as it found it."""
    path = lock_path(output)
    while True:
        f = open(path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise OSError(f"--output {output}: another `blt generate` run is writing it (it holds {path.name}); "
                          "wait for it to end, or choose another --output") from None
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        mine = os.fstat(f.fileno())
        if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
            break
        f.close()  # the run that held it removed the file after we opened it: lock the one there now
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held: a run that opened it meanwhile then locks a new one
        f.close()


def check_settings(output: Path, settings: dict, has_records: bool, write: bool = True) -> None:
    """Refuse to add to an output written with other settings, or to one with records and no settings file
    (whose records' settings are unknown); record this run's next to a new one (`write`: the one process of a
    job that writes it; every process checks, so all of them stop together)."""
    path = settings_path(output)
    if has_records and not path.exists():
        raise ValueError(f"--output {output}: has records but no settings file ({path.name}); it was not written by "
                         "`blt generate --input`, or its settings file was removed; choose another --output")
    if has_records:
        try:
            before = json.loads(path.read_text())
        except ValueError:
            before = None
        if not isinstance(before, dict):
            raise ValueError(f"{path}: unreadable (not a JSON object); delete it to continue {output} as it is")
        keys = set(before) | set(settings)
        if "dtype" not in before:  # written before the dtype was a setting: the weights' digest tells it
            keys.discard("dtype")
        elif before["dtype"] != settings.get("dtype"):  # which changes the digest too: not other weights
            keys.discard("weights")
        changed = [f"{k} {before.get(k)!r} -> {settings.get(k)!r}" for k in sorted(keys)
                   if before.get(k) != settings.get(k)]
        if changed:
            raise ValueError(f"--output {output}: its records were made with other settings ({'; '.join(changed)}); "
                             "rerun with those, or choose another --output")
        return
    if not write:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(settings, indent=1) + "\n")
    os.replace(tmp, path)


def _prepare_output(output: Path, settings: dict, processes: int, me: int) -> list[_Scan]:
    """Check an existing output and the parts a killed job left (of any process count: a multi-process job is
    often rerun as one process) before anything changes: only this command's lines, its settings file, the
    same settings; then (process 0) drop their error and cut-off lines and merge the parts into the output, so
    this run's parts are its own. Returns the scans (the output's first)."""
    scans = [_scan(output, indexed=False)] + [_scan(p, indexed=True) for p in _parts(output)]
    check_settings(output, settings, any(s.size for s in scans), write=me == 0)
    if processes > 1:
        _barrier("bulk_generation_scanned")  # every process has read the files before process 0 changes them
    if me == 0:
        for s in scans:
            _repair(s)
        if len(scans) > 1:
            merged = _merge_parts(output, scans[0].done)
            print(f"blt generate: {output}: merged the {len(scans) - 1} part file(s) a killed job left ({merged} "
                  "finished records)", file=sys.stderr)
    if processes > 1:
        _barrier("bulk_generation_repaired")
    return scans


def generate_file(model: LoadedModel, input: str, output: str, method: MethodConfig,
                  batch_size: int = DEFAULT_BATCH_SIZE, max_positions: int = DEFAULT_MAX_POSITIONS,
                  defaults: Defaults = Defaults(), stop_at_eos: bool = True, ordered: bool = False,
                  progress: bool = True) -> dict:
    """Generate for every record of the JSON Lines file `input` ("-": stdin) into `output` ("-": stdout).

    Records already generated in `output` (an earlier run of the same job), or in the part files a killed
    multi-process job left (merged into it first), are skipped, so rerunning a killed job continues it; records
    with an error line there are generated again (their old lines removed first). An existing `output` (and
    its parts) is checked before anything in it changes: it must hold only lines this function writes, next to
    its settings file. A record that cannot run gets `{"id", "error"}` (plus `"line"` when its id is
    missing or repeated) and the run goes on. Returns a summary (counts, bytes, seconds)."""
    check_max_positions(max_positions)
    processes, me = jax.process_count(), jax.process_index()
    if processes > 1 and "-" in (input, output):
        raise ValueError("--input/--output: under jax.distributed every process reads the input and writes a part "
                         "next to the output; give files on a shared file system, not '-'")
    if input != "-" and output != "-" and Path(input).resolve() == Path(output).resolve():
        raise ValueError(f"--output {output}: is the input file")
    if output != "-" and not Path(output).absolute().parent.is_dir():
        raise FileNotFoundError(f"--output {output}: the folder {Path(output).parent} does not exist")
    # before its files are read, another run may be writing them; under jax.distributed process 0 holds it for
    # the job (it writes the output; the others' parts wait for its checks)
    with _exclusive(Path(output)) if output != "-" and me == 0 else contextlib.nullcontext():
        return _generate_file(model, input, output, method, batch_size, max_positions, defaults, stop_at_eos,
                              ordered, progress, processes, me)


def _generate_file(model: LoadedModel, input: str, output: str, method: MethodConfig, batch_size: int,
                   max_positions: int, defaults: Defaults, stop_at_eos: bool, ordered: bool, progress: bool,
                   processes: int, me: int) -> dict:
    """`generate_file` once its arguments are checked (and the output held)."""
    source = _open_input(input)
    out_path = Path(output)
    try:
        scans = [] if output == "-" else _prepare_output(
            out_path, output_settings(model, method, defaults, stop_at_eos), processes, me)
    except BaseException:
        if source is not sys.stdin.buffer:
            source.close()
        raise
    done = set().union(*[s.done for s in scans])  # all in the output now
    retry = set().union(*[s.failed for s in scans]) - done
    resumed = any(s.size for s in scans)
    # a killed multi-process job's records were merged: the output goes back into input order, as that job's
    from_parts = len(scans) > 1

    total = _count_records(input)
    if total is not None:  # rows no record can fill only cost memory (--batch-size 100000000 ran out of it)
        batch_size = max(1, min(batch_size, total))  # the same on every process
    batcher = ContinuousBatcher(model, method, batch_size, max_positions, stop_at_eos=stop_at_eos,
                                allow_specials=defaults.sampling.allow_specials, sampled=not defaults.sampling.greedy)
    params = ParamsForCost.of(model.cfg)
    tally = _Tally()
    from tqdm import tqdm  # noqa: PLC0415

    bar = tqdm(total=None if total is None else len(range(me, total, processes)), unit="rec", desc="generate",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    if output == "-":
        sink, close = sys.stdout, False
    else:
        sink = open(part_path(out_path, me, processes) if processes > 1 else out_path, "a", encoding="utf-8")
        close = True
    writer = _Writer(sink, ordered=ordered or processes > 1, indexed=processes > 1)
    index_of: dict = {}  # every record's key -> its index: duplicate ids, and input order after a resume
    lines = _records(source)
    t0, cpu0 = time.time(), time.process_time()

    def resolve(index: int, line: Optional[str], kind: str) -> None:
        setattr(tally, kind, getattr(tally, kind) + 1)
        writer.put(index, line)
        bar.update(1)

    def next_request(wait: bool):
        for index, number, raw in lines:
            mine = index % processes == me
            try:
                rec = json.loads(raw)
            except ValueError as e:
                rec, error = None, f"not a JSON object ({e})"
            else:
                error = None if isinstance(rec, dict) else "not a JSON object"
            id_ = rec.get("id") if isinstance(rec, dict) else None
            if error is None and not _usable_id(id_):
                error = "id: missing" if id_ is None else f"id: must be a string or an integer, got {id_!r:.40}"
            if error is None and _id_key(id_) in index_of:
                error = f"id: {id_!r:.40} was used by an earlier record"
            if error is not None:  # no usable id: the record is known by its input line
                key, line = ("line", number), {"id": id_, "line": number, "error": error}
            else:
                key, line = _id_key(id_), None
            index_of[key] = index
            if not mine:
                writer.put(index, None)
                continue
            tally.records += 1
            tally.retried += key in retry
            if key in done:
                resolve(index, None, "skipped")
                continue
            if line is not None:
                resolve(index, _dumps(line), "errors")
                continue
            try:
                data, budget, sampling, seed = record_settings(rec, defaults)
                ids = encode(data, bos=True)
                why = batcher.refusal(len(ids), budget)
                if why:
                    raise RecordError(why)
                key_data = request_key(seed)
            except (RecordError, OverflowError) as e:
                resolve(index, _dumps({"id": id_, "error": str(e)}), "errors")
                continue
            return Request(ids, budget, sampling, key_data, tag=(index, id_))
        return END

    try:
        for fin in batcher.run(next_request):
            index, id_ = fin.request.tag
            tally.new_bytes += len(fin.new_bytes)
            resolve(index, _dumps(result_line(id_, fin, method.method, params)), "generated")
            seconds = time.time() - t0
            bar.set_postfix_str(f"{tally.new_bytes / max(seconds, 1e-9):,.0f} B/s", refresh=False)
    finally:
        bar.close()
        if close:
            sink.close()
        if source is not sys.stdin.buffer:
            source.close()
    seconds = time.time() - t0
    merged = None
    if processes > 1:
        _barrier("bulk_generation_written")
        if me == 0:
            merged = _merge_parts(out_path, done)
    # records appended after an earlier run's (resumed, retried) go back into input order, as one run writes them
    if output != "-" and resumed and me == 0 and (ordered or processes > 1 or from_parts):
        _in_input_order(out_path, index_of)
    if processes > 1:
        _barrier("bulk_generation_merged")
    return {**dataclasses.asdict(tally), "seconds": seconds, "cpu_seconds": time.process_time() - cpu0,
            "bytes_per_second": tally.new_bytes / seconds if seconds > 0 else None, "process": me,
            "processes": processes, "merged_lines": merged}


# ---- `blt generate --input` ------------------------------------------------------------------------------------

BULK_OPTIONS = ("input", "output", "batch_size", "max_positions", "ordered")  # `blt generate` options of this mode


def command(args, *, method: str, draft_len: int, block_size: Optional[int], sampling: SamplingConfig,
            unmask, stop_at_eos: bool) -> int:
    """`blt generate --input FILE --output FILE`: the CLI's options -> `generate_file`; a summary on stderr.
    SIGINT (and SIGTERM, which the CLI turns into it) stop it with every finished record written (exit status 75:
    run it again to continue)."""
    from blt_jax import exit_codes  # noqa: PLC0415
    from blt_jax.generation import api  # noqa: PLC0415

    if args.input is None:
        given = [f"--{o.replace('_', '-')}" for o in BULK_OPTIONS if getattr(args, o, None)]
        raise ValueError(f"{', '.join(given)}: only with --input (bulk generation from a JSON Lines file)")
    other = [flag for flag, given in (("prompt arguments", args.prompts), ("--file", args.file),
                                      ("--stdin", args.stdin), ("--one-per-line", args.one_per_line),
                                      ("--stream", args.stream), ("--json", args.json), ("--sharded", args.sharded))
             if given]
    if other:
        raise ValueError(f"--input: the prompts come from the file (its records are JSON); drop {', '.join(other)}")
    if method not in samplers.CACHED_METHODS:
        raise ValueError(f"--method {method}: bulk generation runs the cached methods "
                         f"({', '.join(samplers.CACHED_METHODS)})")
    check_max_positions(args.max_positions or DEFAULT_MAX_POSITIONS)  # before the model loads
    model = api.load(args.checkpoint, dtype=args.dtype)
    mc = api.method_config(model, method, draft_len, block_size, unmask)
    output = args.output or "-"
    try:
        summary = generate_file(model, args.input, output, mc, batch_size=args.batch_size or DEFAULT_BATCH_SIZE,
                                max_positions=args.max_positions or DEFAULT_MAX_POSITIONS,
                                defaults=Defaults(args.max_new_bytes, sampling, args.seed), stop_at_eos=stop_at_eos,
                                ordered=args.ordered, progress=not args.no_progress)
    except KeyboardInterrupt:
        import jax  # noqa: PLC0415

        processes = jax.process_count()
        where = (output if processes == 1 else
                 f"this process's part ({part_path(Path(output), jax.process_index(), processes).name})")
        print(f"blt generate: stopped; every finished record is in {where}: run the same command again to "
              "continue", file=sys.stderr)
        return exit_codes.INTERRUPTED
    retried = f", {summary['retried']} retried (error lines of an earlier run)" if summary["retried"] else ""
    where = f" [process {summary['process']} of {summary['processes']}]" if summary["processes"] > 1 else ""
    # the whole job's time, not a rate: compiling dominates a small job and would read as a slow generation
    print(f"blt generate: {summary['generated']} generated ({summary['new_bytes']:,} bytes in "
          f"{summary['seconds']:.1f} s, compiling included), {summary['errors']} with an error line, "
          f"{summary['skipped']} already in the output{retried}{where}", file=sys.stderr)
    return exit_codes.OK
