"""Checkpoints in shards (one file per rank, however many clients), read back onto any placement; a torn shard is
refused by name; checkpoints of the per-client format 1 still resume; a reproducible-noise resume of steps drawn
by another noise format is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedhypevae.cli import main
from fedhypevae.config import load_config
from fedhypevae.errors import CheckpointError
from fedhypevae.run import run_training
from fedhypevae.trainer import Trainer


def tiny(*overrides):
    return load_config(
        "tiny", ["privacy.noise_seed=7", "train.checkpoint_every=1", "train.keep_checkpoints=5", *overrides]
    )


def phi(run: Path) -> torch.Tensor:
    sd = torch.load(run / "hypernetwork.pt", weights_only=True)
    return torch.cat([v.reshape(-1).double() for v in sd.values()])


def interrupted(cfg, out: Path, rounds: int = 1) -> Path:
    """A run stopped after `rounds` rounds (checkpointed there); returns that checkpoint."""
    tr = Trainer(cfg, out, progress=False)
    tr.setup()
    for r in range(rounds):
        tr.run_round(r)
        tr.state.round = r + 1
        tr.save_checkpoint()
    tr.ledger.close()
    tr.writer.close()
    return sorted((out / "checkpoints").glob("round_*"))[-1]


def test_a_checkpoint_is_one_shard_per_rank_whatever_the_chunks(tmp_path):
    cfg = tiny("train.rounds=1", "train.chunk_clients=1")  # four chunks of one client: still one shard
    run_training(cfg, tmp_path / "run", progress=False)
    last = sorted((tmp_path / "run" / "checkpoints").glob("round_*"))[-1]
    assert sorted(p.name for p in last.iterdir()) == ["COMPLETE", "rank_00000.pt", "shared.pt"]
    shard = torch.load(last / "rank_00000.pt", weights_only=True)
    assert shard["format"] == 2 and [e["ids"].tolist() for e in shard["blocks"]] == [[0, 1, 2, 3]]
    assert shard["blocks"][0]["state"]["codes"].shape[0] == 4


def test_resuming_with_other_chunks_continues_the_run(tmp_path):
    full = run_training(tiny(), tmp_path / "full", progress=False)
    interrupted(tiny(), tmp_path / "cut")
    res = run_training(tiny("train.chunk_clients=3"), tmp_path / "cut", resume=True, progress=False)
    assert res["privacy"]["steps"] == full["privacy"]["steps"]
    # another chunking sums the rows in another order: the same training up to float rounding
    torch.testing.assert_close(phi(tmp_path / "cut"), phi(tmp_path / "full"), rtol=1e-5, atol=1e-7)


def test_a_torn_shard_is_refused_by_name(tmp_path, capsys):
    last = interrupted(tiny(), tmp_path / "run")
    shard = last / "rank_00000.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a copy cut short
    with pytest.raises(CheckpointError, match=r"rank_00000\.pt.*cannot be read.*delete that checkpoint"):
        run_training(tiny(), tmp_path / "run", resume=True, progress=False)
    code = main(
        [
            "train",
            "--config",
            str(tmp_path / "run" / "config.yaml"),
            "--out",
            str(tmp_path / "run"),
            "--resume",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "rank_00000.pt" in err and "Traceback" not in err


def test_a_shard_missing_a_client_is_refused(tmp_path):
    last = interrupted(tiny(), tmp_path / "run")
    shard = torch.load(last / "rank_00000.pt", weights_only=True)
    entry = shard["blocks"][0]
    entry["ids"] = entry["ids"][:3]
    entry["state"] = {k: v[:3] for k, v in entry["state"].items()}
    torch.save(shard, last / "rank_00000.pt")
    with pytest.raises(CheckpointError, match=r"no shard holds clients \[3\]"):
        run_training(tiny(), tmp_path / "run", resume=True, progress=False)


def test_a_checkpoint_of_format_1_still_resumes(tmp_path):
    """A run checkpointed by a version that wrote one file per client (encoder, code and torch.optim state
    dicts) resumes into the blocks. Secure noise: the replayed steps are charged again (as any secure resume)."""
    cfg = tiny("privacy.noise_seed=null")
    last = interrupted(cfg, tmp_path / "run")
    shard = torch.load(last / "rank_00000.pt", weights_only=True)
    entry = shard["blocks"][0]
    st = entry["state"]
    enc = sorted(k[len("enc.") :] for k in st if k.startswith("enc."))
    order = [n for n in ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias") if n in enc]
    assert sorted(order) == enc
    (last / "clients").mkdir()

    def opt(ms, vs, steps, row):
        return {
            "state": {
                k: {"step": torch.tensor(float(steps[k])), "exp_avg": m[row], "exp_avg_sq": v[row]}
                for k, (m, v) in enumerate(zip(ms, vs))
            },
            "param_groups": [{"params": list(range(len(ms)))}],
        }

    for row, cid in enumerate(entry["ids"].tolist()):
        torch.save(
            {
                "id": cid,
                "encoder": {n: st[f"enc.{n}"][row] for n in order},
                "code": st["codes"][row],
                "enc_opt": opt(
                    [st[f"enc_m.{n}"] for n in order], [st[f"enc_v.{n}"] for n in order], st["enc_steps"][row], row
                ),
                "code_opt": opt([st["code_m"]], [st["code_v"]], st["code_steps"][row], row),
                "mmd_target": st["mmd_target"][row],
                "mmd_weights": st["mmd_weights"][row],
            },
            last / "clients" / f"client_{cid:05d}.pt",
        )
    (last / "rank_00000.pt").unlink()
    tr = Trainer(cfg, tmp_path / "run", resume=True, progress=False)
    tr.setup()
    got = tr.blocks[0].state()
    for k, v in st.items():
        assert torch.equal(got[k], v), k
    tr.ledger.close()
    tr.writer.close()


def test_a_reproducible_resume_of_steps_drawn_another_way_is_refused(tmp_path, capsys):
    interrupted(tiny(), tmp_path / "run")
    led = tmp_path / "run" / "ledger" / "rank_00000.jsonl"
    text = led.read_text()
    assert '"digest":"noise3:' in text
    # as the earlier versions wrote them: noise2 (generators seeded with 32 bits of the seed), noise1 (no prefix)
    led.write_text(text.replace('"digest":"noise3:', '"digest":"noise2:'))
    with pytest.raises(
        CheckpointError, match=r"earlier version \(noise2: generators seeded with 32 bits.*draws noise3"
    ):
        run_training(tiny(), tmp_path / "run", resume=True, progress=False)
    led.write_text(text.replace('"digest":"noise3:', '"digest":"'))
    with pytest.raises(CheckpointError, match=r"drawn by an earlier version \(noise1.*this version draws noise3"):
        run_training(tiny(), tmp_path / "run", resume=True, progress=False)
    code = main(
        [
            "train",
            "--config",
            str(tmp_path / "run" / "config.yaml"),
            "--out",
            str(tmp_path / "run"),
            "--resume",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "noise_seed" in err.splitlines()[0] and "Traceback" not in err


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident set from /proc")
def test_a_resume_hands_back_the_pages_of_the_shard_it_read_and_loses_nothing(tmp_path):
    """release_pages (called on every stack a resume copied rows from) drops the memory-mapped shard's pages from the
    resident set, also while another process (another rank resuming from that shard) maps the same pages;
    the stacks still read the same numbers afterwards (from the file). Heap memory is left alone, not zeroed."""
    from fedhypevae.checkpoint import release_pages

    want = torch.randn(2000, 8192)  # 64 MiB
    torch.save({"x": want}, tmp_path / "shard.pt")
    # another process (another rank resuming from the same shard) maps and reads the same file meanwhile
    reader = (
        "import sys, torch; x = torch.load(sys.argv[1], mmap=True, weights_only=True)['x']; "
        "print(float(x.sum()), flush=True); sys.stdin.read()"
    )
    other = subprocess.Popen(
        [sys.executable, "-c", reader, str(tmp_path / "shard.pt")], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert other.stdout.readline()  # the other process has touched every page
        x = torch.load(tmp_path / "shard.pt", mmap=True, weights_only=True)["x"]
        before = _rss_file_kb()
        assert torch.equal(x, want)  # reads every page
        touched = _rss_file_kb()
        release_pages(x)
        after = _rss_file_kb()
    finally:
        other.stdin.close()
        other.wait(timeout=60)
    assert touched - before > 48 * 1024, (before, touched)
    assert after - before < 8 * 1024, (before, touched, after)
    assert torch.equal(x, want)
    heap = torch.randn(1000, 1000)
    copy = heap.clone()
    release_pages(heap)
    assert torch.equal(heap, copy)
