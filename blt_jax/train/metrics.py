"""Metric sinks: a JSONL file and TensorBoard event files (written by process 0 only)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np


class MetricsWriter:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self._jsonl = open(Path(run_dir) / "metrics.jsonl", "a")
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


def read_metrics(run_dir: str | Path, split: Optional[str] = None) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if split is None or r.get("split") == split]
