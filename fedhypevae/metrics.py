"""Metrics through one writer on rank 0: JSONL always, TensorBoard event files alongside, and the run's
lifecycle events.

Keys follow `area/name(unit)`: `privacy/epsilon`, `time/round(s)`, `comm/all_reduce(ms)`.
Keys under `diagnostics/` are functions of private data outside the DP guarantee, and so are the
timings (they depend on the realized batch sizes); with `privacy.diagnostics: false` neither is
recorded. `RUN/events.jsonl` records start, resumed (from which round and step, which logged rounds
were cut because the checkpoint precedes them, which settings changed), finished and partial.

A resumed run continues `metrics.jsonl` after the checkpoint's round (later rows, written after the
checkpoint by the interrupted attempt, are cut) and TensorBoard with `purge_step` (TensorBoard then
hides the interrupted attempt's events from that step on), so no round appears twice.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

METRICS = "metrics.jsonl"
EVENTS = "events.jsonl"


class MetricWriter:
    def __init__(
        self,
        out_dir: Path,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        purge_step: int | None = None,
        fresh: bool = False,
    ):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        self._jsonl = open(out_dir / METRICS, "w" if fresh else "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: slow import

            self._tb = SummaryWriter(log_dir=str(out_dir / "tb"), purge_step=purge_step)

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
            self._jsonl = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def cut_metrics(out_dir: Path, *, keep_through: int) -> tuple[list, list]:
    """Drop the rows of metrics.jsonl after round `keep_through` (a resume restarts there), and rows half
    written when a process died; rewritten atomically. Returns (the rows kept, the rounds cut)."""
    from .atomic import atomic_write_text

    f = Path(out_dir) / METRICS
    if not f.is_file():
        return [], []
    lines = f.read_text().splitlines()
    keep, rows, cut = [], [], []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # empty, or a row half written when the process died
            continue
        if row.get("round", 0) <= keep_through:
            keep.append(line)
            rows.append(row)
        else:
            cut.append(int(row["round"]))
    if len(keep) != len(lines):
        atomic_write_text(f, "".join(line + "\n" for line in keep))
    return rows, cut


def append_event(out_dir: Path, event: dict) -> None:
    from .checkpoint import dumps_json

    with open(Path(out_dir) / EVENTS, "a") as fh:
        fh.write(dumps_json({"time": round(time.time(), 3), **event}) + "\n")


def read_events(out_dir: Path) -> list:
    f = Path(out_dir) / EVENTS
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
