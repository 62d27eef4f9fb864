"""Metric sinks: a JSONL file and TensorBoard event files (written by process 0 only)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np


class MetricsWriter:
    """Appends rows to `metrics.jsonl` (and TensorBoard). `keep_through_step`: a resumed run first cuts the log
    back to the restored step, so the steps it replays appear once (a torn last line from a kill goes too)."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, keep_through_step: Optional[int] = None):
        self.enabled = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        path = Path(run_dir) / "metrics.jsonl"
        if keep_through_step is not None and path.exists():
            _truncate_log(path, keep_through_step)
        self._jsonl = open(path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter  # noqa: PLC0415  (optional heavy import)
            self._tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: float(np.asarray(v)) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), "split": prefix, "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(f"{prefix}/{k}", v, int(step))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _rows(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill mid-write
            continue
    return rows


def _truncate_log(path: Path, last_step: int) -> None:
    text = path.read_text()
    kept = [line for line, row in ((line, _rows(line)) for line in text.splitlines())
            if row and row[0].get("step", 0) <= last_step]
    if len(kept) != len(text.splitlines()):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


def logged(run_dir: str | Path, step: int, split: str) -> Optional[dict]:
    """The metrics a run's log already holds for (step, split), without the row's step, split and time."""
    rows = [r for r in read_metrics(run_dir, split) if r.get("step") == step]
    return {k: v for k, v in rows[-1].items() if k not in ("step", "split", "time")} if rows else None


def read_metrics(run_dir: str | Path, split: Optional[str] = None) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in _rows(path.read_text()) if split is None or r.get("split") == split]
