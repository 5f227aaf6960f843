"""Metrics through one writer on rank 0: JSONL always, TensorBoard event files alongside.

Keys follow `area/name(unit)`: `privacy/epsilon`, `time/round(s)`, `comm/all_reduce(ms)`.
Keys under `diagnostics/` are functions of private data outside the DP guarantee
(switch them off with `privacy.diagnostics: false`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path


class MetricWriter:
    def __init__(self, out_dir: Path, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        self._jsonl = open(out_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: slow import

            self._tb = SummaryWriter(log_dir=str(out_dir / "tb"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if v is not None and math.isfinite(float(v)) else None) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"round": step, **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if v is not None:
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
