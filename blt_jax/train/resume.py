"""What a resumed run may change, decided per config field, and the record of what it changed.

Resuming restores the model, the optimiser and the data iterator's position. The model's shape cannot
change (`checkpoint.check_compatible`). The data iterator's position counts windows of `data.seq_len` bytes in
batches of `data.batch_size`, drawn in an order fixed by `data.seed` and split over `data.worker_count`
workers: a different value of any of these would silently read other data than the saved position means, so
it is refused. Everything else may change - a longer `steps` extends the schedule, a new learning rate or
log interval applies from the restored step on - and each accepted change is recorded in run.json's
`history` with the step it starts at.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

from blt_jax.config import RunConfig
from blt_jax.train.checkpoint import CheckpointMismatch

# fields that fix what the saved data-iterator position means
FIXED_ON_RESUME = {
    "data.seq_len": "the saved data position counts windows of this many bytes",
    "data.batch_size": "the saved data position counts batches of this many windows",
    "data.seed": "the saved data position is a place in the order this seed draws",
    "data.worker_count": "the saved data position is split over this many data workers",
}


def _leaves(d: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in d.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def config_changes(saved: RunConfig, wanted: RunConfig) -> dict[str, list]:
    """{dotted field: [saved value, wanted value]} for every field that differs (lists for tuples)."""
    old, new = dict(_leaves(saved.to_dict())), dict(_leaves(wanted.to_dict()))
    as_json = lambda v: json.loads(json.dumps(v))  # noqa: E731 (tuples -> lists, as run.json stores them)
    return {k: [as_json(old.get(k)), as_json(new.get(k))] for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)}


def check_resume(saved: RunConfig, wanted: RunConfig, kind: str, step: int) -> dict[str, list]:
    """The changes a resume from `step` would make; CheckpointMismatch (one line, naming the field and what to
    do) for one that cannot be right. Nothing has been consumed at step 0, so then anything goes."""
    changes = config_changes(saved, wanted)
    if step == 0:
        return changes
    for name, why in FIXED_ON_RESUME.items():
        if name in changes:
            old, new = changes[name]
            raise CheckpointMismatch(f"{name}: the run was trained with {old!r}, now {new!r}; a resumed run keeps it "
                                     f"({why}). Resume with --set {name}={json.dumps(old)}, or start a new run "
                                     f"directory")
    section = "entropy_train" if kind == "entropy" else "train"
    steps = getattr(wanted, section).steps
    if steps < step:
        raise CheckpointMismatch(f"{section}.steps: {steps} ends before step {step}, where the run already is; "
                                 f"give at least {step} (more extends the schedule), or start a new run directory")
    return changes


def history_entry(step: int, changes: dict[str, list]) -> dict:
    return {"step": step, "time": time.time(), "changes": changes}
