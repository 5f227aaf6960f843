"""What crosses the rank boundary: with privacy.diagnostics off, nothing but noisy releases and public counts."""

import json

import torch
from fedhypevae.hpc import LocalCommunicator

from fedhypevae.client import DIAG_KEYS
from fedhypevae.config import load_config
from fedhypevae.run import run_training


class RecordingCommunicator(LocalCommunicator):
    def __init__(self):
        self.payloads = []

    def allreduce(self, buf, op="sum"):
        self.payloads.append(buf.detach().clone())
        return super().allreduce(buf, op)


def test_diagnostics_off_sends_only_public_counts_beside_the_noisy_gradient(tmp_path):
    comm = RecordingCommunicator()
    cfg = load_config("tiny", ["train.rounds=2", "privacy.diagnostics=false"])
    res = run_training(cfg, tmp_path / "run", comm, progress=False)
    D = len(DIAG_KEYS)
    big = [p for p in comm.payloads if p.numel() > 100]
    grad_buffers = [p for p in big if p.numel() > 1000 and p.numel() != big[-1].numel()]
    assert len(grad_buffers) == 4  # 2 rounds x 2 steps
    for p in grad_buffers:
        tail = p[-D:]
        expected = torch.zeros(D, dtype=torch.float64)
        expected[DIAG_KEYS.index("clients")] = cfg.partition.clients
        assert torch.equal(tail, expected), tail
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and not any(k.startswith("diagnostics/") for r in rows for k in r)
    assert res["training"]["final"] == {} and res["privacy"]["diagnostics_outside_guarantee"] is False


def test_diagnostics_on_are_labelled_outside_the_guarantee(tmp_path):
    res = run_training(load_config("tiny", ["train.rounds=1"]), tmp_path / "run", progress=False)
    assert res["privacy"]["diagnostics_outside_guarantee"] is True
    assert all(k.startswith("diagnostics/") for k in res["training"]["final"])
    assert "outside the guarantee" in res["privacy"]["guarantee"]
