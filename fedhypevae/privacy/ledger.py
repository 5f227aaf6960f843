"""The privacy ledger: one durable, append-only file per rank, one record per release for the block of
clients the rank hosts (ledger format 2).

Layout: ``RUN/ledger/rank_00000.jsonl``, one JSON object per line, two kinds of line:

* a **block** line, written once per process before its first record::

      {"format": 2, "block": "9f2c41d07a3be511", "clients": [[0, 3], [7, 7]], "session": 2,
       "rank": 0, "world_size": 2}

  ``clients`` lists the hosted client ids as inclusive ranges; ``block`` is a hash of them (the same
  placement gives the same id in every session); ``session`` numbers the processes that wrote to the
  run (1 for the first start, one more for every resume), so records of different files can be put
  in order. A rank that kept an earlier session's blocks whole on a resume (another world size, reproducible
  noise) writes one block line per kept block instead, and its records name those blocks.
* a **record** line, one per release, appended and fsync'd BEFORE the release it pays for::

      {"block": "9f2c41d07a3be511", "mechanism": "dp-sgd", "sigma": 1.4977, "q": 0.2,
       "key": "round=3/step=1", "epoch": 0, "private": {"digest": "5b0e..."}}

  Every client of the block is charged one (mechanism, sigma, q) release; with secure aggregation a
  DP-SGD or class-statistics record also carries ``"integer": [A, d]`` (the Skellam mechanism of
  ``privacy/integer.py``, accounted as such; absent for the Gaussian). ``key`` names the release
  (the step, or ``mmd`` / ``stats`` for the one-shot releases); ``epoch`` counts the releases made
  under one key (an epoch > 0 is a re-release after a resume that was not bit-identical, drawn under
  fresh noise). ``private.digest`` (reproducible noise only) is a digest of the pre-noise payload of
  the block: a replay is free only if its payload has the same digest. It is a function of private
  data: the ledger files are as private as the client checkpoints (``fedhypevae account`` prints
  only the public fields).

A record is never rewritten. A truncated last line (a charge whose write never completed, hence a
release that never happened) is dropped, and cut off the file by the rank that owns it. Any
client's full history is the records of every block that contains it, in (session, line) order, so
the ledger can be read back onto any world size: a resumed run on another number of ranks reads
every file and appends to its own. Ledgers written before format 2 (one ``ledger.jsonl`` per client
under ``RUN/clients/client_NNNNN/``) are read as blocks of one client, epochs counted per key, no
digests (a replay of them is never free).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import PrivacyError
from .accounting import DP_SGD, MECHANISM_NAMES, Mechanism, PrivacyPlan, epsilon_of, history_fits, validate_mechanism

LEDGER_FORMAT = 2
LEDGER_DIR = "ledger"
V1_GLOB = "clients/client_*/ledger.jsonl"


@dataclass(frozen=True)
class Release:
    """One record: every client of ``block`` released ``mechanism`` at (sigma, q) under (key, epoch)."""

    mechanism: str
    sigma: float
    q: float
    key: str
    epoch: int
    block: str
    session: int
    digest: str | None = None  # private: digest of the block's pre-noise payload (reproducible noise)
    integer: tuple = ()  # Mechanism.integer: (A, dim) of DP-SGD on the integer path of secure aggregation

    def __post_init__(self):
        object.__setattr__(self, "integer", tuple(float(x) for x in self.integer))  # as Mechanism keeps it

    def public(self) -> dict:
        out = {
            "mechanism": self.mechanism,
            "sigma": self.sigma,
            "q": self.q,
            "key": self.key,
            "epoch": self.epoch,
            "block": self.block,
            "session": self.session,
        }
        if self.integer:
            out["integer"] = list(self.integer)
        return out


def client_ranges(ids: Sequence[int]) -> list:
    """Sorted client ids as inclusive [lo, hi] ranges."""
    out: list = []
    for i in sorted(int(c) for c in ids):
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        elif not out or i > out[-1][1]:
            out.append([i, i])
    return out


def expand_ranges(ranges) -> np.ndarray:
    if not ranges:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(int(lo), int(hi) + 1, dtype=np.int64) for lo, hi in ranges])


def block_id(ranges) -> str:
    return hashlib.sha256(json.dumps(ranges, separators=(",", ":")).encode()).hexdigest()[:16]


def rank_file(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / LEDGER_DIR / f"rank_{rank:05d}.jsonl"


def has_ledger(run_dir: Path) -> bool:
    """Whether a run directory holds any privacy ledger (of either format)."""
    run_dir = Path(run_dir)
    return any((run_dir / LEDGER_DIR).glob("rank_*.jsonl")) or any(run_dir.glob(V1_GLOB))


class PrivacyLedger:
    """The ledger of the clients one process hosts (``clients``), or of every client of a run
    (``clients=None``, read only: ``fedhypevae account``).

    With ``run_dir``, every file of the run is read (this rank's histories may have been written by
    other ranks, under another world size) and charges are appended to this rank's own file, one
    write and one fsync per release. Without ``run_dir`` the ledger lives in memory (baselines,
    tests). Every client of this process is charged by every record this process writes.
    """

    def __init__(
        self,
        clients: Sequence[int] | None = None,
        *,
        run_dir=None,
        rank: int = 0,
        world_size: int = 1,
        fsync: bool = True,
    ):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.rank, self.world_size, self.fsync = int(rank), int(world_size), fsync
        self.read_only = clients is None
        self.records: list[Release] = []  # every record that touches a hosted client, in file order
        self._block_ids: dict = {}  # block id -> positions in self.ids of the hosted clients it contains
        self._by_key: dict = {}  # (mechanism, key) -> [Release]
        self._counts: dict = {}  # block -> {(mechanism, sigma, q): releases}
        self._groups: list = []  # (mechanism, sigma, q) in order of first appearance
        self._fd: int | None = None
        self._patterns = None
        self.session = 1
        self.fsync_seconds = 0.0  # time spent in fsync (reported by the benchmarks and docs)
        self.fsyncs = 0
        raw_blocks, raw_records = self._read_all() if self.run_dir is not None else ({}, [])
        if clients is None:
            known = list(raw_blocks.values())
            clients = np.unique(np.concatenate(known)) if known else np.zeros(0, dtype=np.int64)
        self.ids = np.asarray(sorted(int(c) for c in clients), dtype=np.int64)
        self.block = block_id(client_ranges(self.ids.tolist()))
        self._written_blocks: set = set()  # the blocks whose line this process has written
        self._block_ranges: dict = {}  # block id -> client ranges, for the blocks of parts (charge(parts=...))
        for bid, ids in raw_blocks.items():
            pos = self._positions(ids)
            if len(pos):
                self._block_ids[bid] = pos
        for rec in raw_records:
            if rec.block in self._block_ids:
                self._add(rec)
        self._block_ids.setdefault(self.block, np.arange(len(self.ids)))

    # ------------------------------------------------------------------ reading
    def _positions(self, ids: np.ndarray) -> np.ndarray:
        """Positions in self.ids of those of `ids` that this ledger hosts."""
        if not len(self.ids):
            return np.zeros(0, dtype=np.int64)
        pos = np.searchsorted(self.ids, ids)
        pos = np.clip(pos, 0, len(self.ids) - 1)
        return np.unique(pos[self.ids[pos] == ids])

    def _read_all(self):
        """Every block and record of the run: format-2 rank files, then format-1 per-client files."""
        blocks: dict = {}  # block id -> client ids
        records: list = []
        sessions = [0]
        own = rank_file(self.run_dir, self.rank)
        for path in sorted((self.run_dir / LEDGER_DIR).glob("rank_*.jsonl")):
            current = 0
            for kind, obj in _read_lines(path, repair=(path == own and not self.read_only)):
                if kind == "block":
                    ids = expand_ranges(obj["clients"])  # the same block id names the same clients
                    blocks.setdefault(obj["block"], ids)
                    current = obj["session"]
                    sessions.append(current)
                else:
                    if obj["block"] not in blocks:
                        raise PrivacyError(
                            f"privacy ledger {path}: a record names block {obj['block']!r} that no "
                            "earlier line defines; the file is corrupt and cannot be trusted"
                        )
                    records.append(
                        Release(
                            obj["mechanism"],
                            float(obj["sigma"]),
                            float(obj["q"]),
                            str(obj["key"]),
                            int(obj["epoch"]),
                            obj["block"],
                            int(current),
                            (obj.get("private") or {}).get("digest"),
                            obj.get("integer", ()),
                        )
                    )
        for path in sorted(self.run_dir.glob(V1_GLOB)):
            cid = _v1_client(path)
            bid = f"v1-client-{cid:05d}"
            blocks[bid] = np.asarray([cid], dtype=np.int64)
            epochs: dict = {}
            for mech, sigma, q, key in _read_v1(path):
                e = epochs.get((mech, key), 0)
                epochs[(mech, key)] = e + 1
                records.append(Release(mech, sigma, q, key, e, bid, 0, None))
        self.session = max(sessions) + 1
        records.sort(key=lambda r: r.session)  # stable: file order within a session
        return blocks, records

    def _add(self, rec: Release) -> None:
        self.records.append(rec)
        self._by_key.setdefault((rec.mechanism, rec.key), []).append(rec)
        if rec.block not in self._counts:
            self._patterns = None  # a block's first record: the grouping of clients by blocks changes
        counts = self._counts.setdefault(rec.block, {})
        g = (rec.mechanism, rec.sigma, rec.q, rec.integer)
        if g not in self._groups:
            self._groups.append(g)
        counts[g] = counts.get(g, 0) + 1

    # ------------------------------------------------------------------ histories
    def _pattern_list(self):
        """Clients grouped by the set of blocks that contain them: [(positions, [block ids])]."""
        if self._patterns is None:
            blocks = [b for b in self._block_ids if b in self._counts]
            if not blocks:
                self._patterns = [(np.arange(len(self.ids)), [])]
            else:
                rng = np.random.default_rng(0)
                sig = np.zeros(len(self.ids), dtype=np.uint64)
                tags = rng.integers(1, 2**63, size=len(blocks), dtype=np.int64).astype(np.uint64)
                for b, t in zip(blocks, tags):
                    sig[self._block_ids[b]] ^= t
                uniq, inverse = np.unique(sig, return_inverse=True)
                out = []
                for k in range(len(uniq)):
                    pos = np.nonzero(inverse == k)[0]
                    first = pos[0]
                    members = [b for b in blocks if _contains(self._block_ids[b], first)]
                    out.append((pos, members))
                self._patterns = out
        return self._patterns

    def _history(self, blocks: list, extra: Sequence[Mechanism] = ()) -> list:
        total: dict = {}
        for b in blocks:
            for g, n in self._counts.get(b, {}).items():
                total[g] = total.get(g, 0) + n
        for m in extra:
            g = (m.name, m.noise_multiplier, m.sample_rate, m.integer)
            total[g] = total.get(g, 0) + m.steps
        order = self._groups + [g for g in total if g not in self._groups]
        return [Mechanism(g[0], g[1], g[2], total[g], g[3]) for g in order if total.get(g, 0) > 0]

    def histories(self) -> list:
        """[(client ids, [Mechanism])]: the clients that share one history, with that history."""
        return [(self.ids[pos], self._history(blocks)) for pos, blocks in self._pattern_list()]

    def history(self, client: int) -> list:
        for ids, hist in self.histories():
            if int(client) in set(ids.tolist()):
                return hist
        raise PrivacyError(f"client {client} has no privacy ledger here (clients {self._describe()})")

    def client_records(self, client: int) -> list:
        """Every release of `client`, in order (session, then line)."""
        pos = self._positions(np.asarray([int(client)]))
        if not len(pos):
            raise PrivacyError(f"client {client} is not in this ledger (clients {self._describe()})")
        p = int(pos[0])
        return [r for r in self.records if _contains(self._block_ids[r.block], p)]

    def _describe(self) -> str:
        return "none" if not len(self.ids) else f"{int(self.ids[0])}..{int(self.ids[-1])}"

    def epsilon(self, *, delta: float, accountant: str) -> float:
        """Epsilon spent so far by the worst-off hosted client."""
        cache: dict = {}
        worst = 0.0
        for _, blocks in self._pattern_list():
            hist = self._history(blocks)
            k = tuple(hist)
            if k not in cache:
                cache[k] = epsilon_of(hist, delta=delta, accountant=accountant)
            worst = max(worst, cache[k])
        return worst

    def steps(self, mechanism: str = DP_SGD) -> int:
        """The most releases of `mechanism` any hosted client has made."""
        return max(
            (sum(m.steps for m in self._history(b) if m.name == mechanism) for _, b in self._pattern_list()), default=0
        )

    def summary(self, *, delta: float, accountant: str) -> list:
        """One row per mechanism group of the worst-off client's history, with the epsilon it spends alone."""
        worst, rows = -1.0, []
        for _, blocks in self._pattern_list():
            hist = self._history(blocks)
            eps = epsilon_of(hist, delta=delta, accountant=accountant)
            if eps > worst:
                worst = eps
                rows = [
                    {
                        "mechanism": m.name,
                        "sigma": m.noise_multiplier,
                        "q": m.sample_rate,
                        "steps": m.steps,
                        "epsilon_alone": epsilon_of([m], delta=delta, accountant=accountant),
                        **({"integer": list(m.integer)} if m.integer else {}),
                    }
                    for m in hist
                ]
        return rows

    # ------------------------------------------------------------------ the guard's questions
    def latest(self, mechanism: str, key: str, block: str | None = None) -> Release | None:
        """The last release under `key` made by exactly this block of clients (or by `block`, a block of some of
        them): the one a replay can match."""
        block = self.block if block is None else block
        for rec in reversed(self._by_key.get((mechanism, key), [])):
            if rec.block == block:
                return rec
        return None

    def fresh_epoch(self, mechanism: str, key: str) -> int:
        """An epoch under which none of the hosted clients has released `key` yet."""
        return 1 + max((r.epoch for r in self._by_key.get((mechanism, key), [])), default=-1)

    def released(self, mechanism: str, key: str) -> bool:
        return bool(self._by_key.get((mechanism, key)))

    @staticmethod
    def identical(candidate: Release | None, sigma: float, q: float, digest: str | None, integer: tuple = ()) -> bool:
        """Whether a release would re-release exactly what `candidate` released (then it costs nothing)."""
        return (
            candidate is not None
            and digest is not None
            and candidate.digest == digest
            and candidate.sigma == float(sigma)
            and candidate.q == float(q)
            and candidate.integer == tuple(map(float, integer))
        )

    def fits(
        self, mechanism: str, sigma: float, q: float, plan: PrivacyPlan, integer: tuple = (), clients=None
    ) -> bool:
        """Budget guard: would every hosted client (or every one of `clients`) stay within the plan's target after
        one more release (with the plan's not-yet-released one-shot releases still to come)?"""
        extra = [Mechanism(mechanism, float(sigma), float(q), 1, integer)]
        patterns = self._pattern_list()
        if clients is not None:
            mine = self._positions(np.asarray(sorted(clients), dtype=np.int64))
            patterns = [(pos, blocks) for pos, blocks in patterns if np.isin(pos, mine).any()]
        return all(history_fits(self._history(blocks), extra, plan) for _, blocks in patterns)

    def touched(self, mechanism: str, key: str, epoch: int | None, clients) -> bool:
        """Whether any of `clients` released `key` under `epoch` (then that epoch's noise is not fresh for them), or
        under any epoch (None)."""
        mine = self._positions(np.asarray(sorted(clients), dtype=np.int64))
        return any(
            (epoch is None or r.epoch == epoch) and np.isin(self._block_ids[r.block], mine).any()
            for r in self._by_key.get((mechanism, key), [])
        )

    # ------------------------------------------------------------------ charging
    def charge(
        self,
        mechanism: str,
        sigma: float,
        q: float,
        key: str,
        *,
        epoch: int = 0,
        digest: str | None = None,
        integer: tuple = (),
        parts: Sequence[tuple] | None = None,
    ) -> Release | list[Release]:
        """Record one release of every hosted client BEFORE it is made: written and fsync'd when file-backed; returns
        the record. `parts` [(block id, digest)]: one record per part instead, each for a block of hosted clients
        registered once with `sub_block` (a rank that kept an earlier session's blocks whole records its releases
        block by block), one write, one fsync; returns the records."""
        if self.read_only:
            raise PrivacyError("this ledger was opened read only")
        if mechanism not in MECHANISM_NAMES:
            raise PrivacyError(f"unknown mechanism {mechanism!r}; valid: {', '.join(MECHANISM_NAMES)}")
        validate_mechanism(Mechanism(mechanism, float(sigma), float(q), 1, integer))
        whole = parts is None
        recs, lines = [], []
        for block, dig in [(self.block, digest)] if whole else parts:
            if block not in self._block_ranges and block != self.block:
                raise PrivacyError(f"block {block!r} was never registered with sub_block on this ledger")
            rec = Release(
                mechanism,
                float(sigma),
                float(q),
                str(key),
                int(epoch),
                block,
                self.session,
                None if dig is None else str(dig),
                integer,
            )
            line = {
                "block": rec.block,
                "mechanism": rec.mechanism,
                "sigma": rec.sigma,
                "q": rec.q,
                "key": rec.key,
                "epoch": rec.epoch,
            }
            if rec.integer:
                line["integer"] = list(rec.integer)
            if rec.digest is not None:
                line["private"] = {"digest": rec.digest}
            recs.append(rec)
            lines.append(line)
        if self.run_dir is not None:
            self._write(lines)
        for rec in recs:
            self._add(rec)
        return recs[0] if whole else recs

    def sub_block(self, ids) -> str:
        """Register the block of `ids` (hosted clients) for `charge(parts=...)`; returns its id."""
        ranges = client_ranges(sorted(int(i) for i in ids))
        bid = block_id(ranges)
        if bid not in self._block_ids:
            pos = self._positions(expand_ranges(ranges))
            if len(pos) != len(expand_ranges(ranges)):
                raise PrivacyError(f"a block of clients {ranges} that this rank does not host ({self._describe()})")
            self._block_ids[bid] = pos
        self._block_ranges[bid] = ranges
        return bid

    def _write(self, lines: list) -> None:
        import time

        if self._fd is None:
            path = rank_file(self.run_dir, self.rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        data = b""
        for obj in lines:
            if obj["block"] not in self._written_blocks:  # a block line once per process, before its first record
                head = {
                    "format": LEDGER_FORMAT,
                    "block": obj["block"],
                    "clients": self._block_ranges.get(obj["block"]) or client_ranges(self.ids.tolist()),
                    "session": self.session,
                    "rank": self.rank,
                    "world_size": self.world_size,
                }
                data += (json.dumps(head, separators=(",", ":")) + "\n").encode()
            data += (json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n").encode()
        os.write(self._fd, data)  # one O_APPEND write: a crash leaves whole lines or a truncated last one
        if self.fsync:
            t = time.perf_counter()
            os.fsync(self._fd)
            self.fsync_seconds += time.perf_counter() - t
            self.fsyncs += 1
        self._written_blocks.update(obj["block"] for obj in lines)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def read_client_releases(run_dir, client: int) -> list:
    """One client's releases in a run, in order, as {mechanism, sigma, q, key, epoch} (public fields)."""
    led = PrivacyLedger(None, run_dir=run_dir)
    return [{k: v for k, v in r.public().items() if k not in ("block", "session")} for r in led.client_records(client)]


def last_session_blocks(run_dir) -> list[list[int]]:
    """The client ids of every block the run's last session with a charge wrote (one per rank of that session, or
    one per group a rank kept whole), in rank order; [] without a format-2 ledger. A resume on another world size can
    keep these groups whole so that a replayed release is computed by the same block of clients as before
    (`hpc.placement.place_groups`)."""
    found: dict = {}  # session -> [(rank, client ids)]
    for path in sorted((Path(run_dir) / LEDGER_DIR).glob("rank_*.jsonl")):
        for kind, obj in _read_lines(path, repair=False):
            if kind == "block":
                found.setdefault(obj["session"], []).append((int(obj["rank"]), expand_ranges(obj["clients"]).tolist()))
    if not found:
        return []
    return [ids for _, ids in sorted(found[max(found)], key=lambda b: b[0])]


def _contains(sorted_positions: np.ndarray, p: int) -> bool:
    i = int(np.searchsorted(sorted_positions, p))
    return i < len(sorted_positions) and int(sorted_positions[i]) == p


def _read_lines(path: Path, *, repair: bool):
    """(kind, object) for every complete line of a format-2 ledger file; a truncated last line is dropped
    (and cut off the file when `repair`: only the rank that owns the file repairs it)."""
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    out, offset, seen_block = [], 0, False
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if line.strip():
            try:
                if last:
                    raise ValueError("no newline: an interrupted write")
                obj = json.loads(line)
                if "clients" in obj:
                    if obj.get("format") != LEDGER_FORMAT:
                        raise PrivacyError(
                            f"privacy ledger {path} has format {obj.get('format')!r}; this version "
                            f"reads format {LEDGER_FORMAT} (and the per-client format 1)"
                        )
                    obj["session"] = int(obj["session"])
                    out.append(("block", obj))
                    seen_block = True
                else:
                    for k in ("block", "mechanism", "sigma", "q", "key", "epoch"):
                        obj[k]  # noqa: B018 - a missing field is corruption
                    if obj["mechanism"] not in MECHANISM_NAMES:
                        raise ValueError(f"unknown mechanism {obj['mechanism']!r}")
                    if not seen_block:
                        raise ValueError("a record before any block line")
                    out.append(("record", obj))
            except PrivacyError:
                raise
            except (ValueError, KeyError, TypeError):
                if not last:
                    raise PrivacyError(
                        f"privacy ledger {path} is corrupt at line {i + 1}; it cannot be trusted "
                        "(restore it from a copy of the run directory or start a new run)"
                    ) from None
                if repair:
                    with open(path, "r+b") as fh:
                        fh.truncate(offset)
                break
        offset += len(line) + 1
    return out


def _v1_client(path: Path) -> int:
    name = path.parent.name
    try:
        return int(name.split("_")[-1])
    except ValueError:
        raise PrivacyError(f"privacy ledger {path}: cannot tell the client from the directory name {name!r}") from None


def _read_v1(path: Path) -> list:
    """Entries of a format-1 per-client ledger (one JSON line per release); a truncated last line is dropped."""
    lines = path.read_bytes().split(b"\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            if i == len(lines) - 1:
                raise ValueError("no newline")
            d = json.loads(line)
            sigma, q = float(d["sigma"]), float(d["q"])
            if d["mechanism"] not in MECHANISM_NAMES or not math.isfinite(sigma):
                raise ValueError(d["mechanism"])
            out.append((d["mechanism"], sigma, q, str(d["key"])))
        except (ValueError, KeyError, TypeError):
            if i == len(lines) - 1:
                break
            raise PrivacyError(
                f"privacy ledger {path} (per-client format 1) is corrupt at line {i + 1}; it cannot be trusted"
            ) from None
    return out


def payload_digest(tensors) -> str:
    """A 128-bit digest (xxh3) of tensors' exact bits, dtypes and shapes: two payloads with the same digest
    are (up to a collision, which no one here is trying to find) bit-identical. The ledger keeps it in
    its private part; it is as private as the payload."""
    import torch
    import xxhash

    h = xxhash.xxh3_128()
    for t in tensors:
        t = t.detach()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(memoryview(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()
