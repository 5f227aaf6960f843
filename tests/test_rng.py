"""The public seed tags: one registered tag per public use of the seed, distinct, and never renumbered."""

from __future__ import annotations

import pytest

from fedhypevae.rng import METHOD_STREAMS, STREAM_MMD_RELEASE, STREAM_STATS_RELEASE, STREAM_STEP, SeedTag

# the values every earlier run used: a changed value changes every result drawn from it
PINNED = {
    "MODEL_INIT": 4,
    "BASELINE_SHUFFLE": 101,
    "DPCVAE_SYNTH": 202,
    "PHI_INIT": 0xF1,
    "MERF_FEATURES": 0xFEA7,
    "METACODE_FIT": 0x3E7A,
    "SYNTH_DRAW": 0x5A7,
    "GENERATE": 0x6E7,
    "EVAL_CLIENT": 0xE7A1,
    "SENSITIVITY_PROBE": 0x5E45,
    "AUDIT": 0xA0D1,
    "GAUSSIAN_SYNTH": 0x6A55,
    "AUDIT_COINS": 0xC0,
    "AUDIT_LAYOUT": 0xC1,
    "AUDIT_SAMPLE": 0xC2,
    "AUDIT_SCORE": 0xC3,
}


def test_public_seed_tags_are_distinct_and_apart_from_the_private_streams():
    values = [int(t) for t in SeedTag.__members__.values()]  # aliases included: an alias is a duplicate
    assert len(values) == len(set(values))
    private = {STREAM_STEP, STREAM_MMD_RELEASE, STREAM_STATS_RELEASE, *METHOD_STREAMS.values()}
    assert not private & set(values)
    assert all(0 <= v < 2**63 for v in values)


def test_every_public_seed_tag_says_what_it_seeds_in_one_line():
    for tag in SeedTag:
        assert tag.meaning.strip() and "\n" not in tag.meaning, tag.name


def test_public_seed_tag_values_are_never_renumbered():
    assert {t.name: int(t) for t in SeedTag} == PINNED


def test_private_generators_use_every_bit_of_their_seed():
    """torch's manual_seed keeps a seed's low 32 bits: two private streams whose seeds differ above them would draw the
    same noise (and a release's noise could be found among 2^32 seeds). secret_generators derive mt19937's whole
    state from all 63 bits; their draws are standard normal and independent between seeds, and a client's
    generator is the same object on every call (reproducible noise stays reproducible)."""
    import numpy as np
    import torch

    from fedhypevae.rng import ClientRNG, client_seeds, generators, secret_generators

    lo = 0x5EED
    seeds = [lo, lo + 2**32, lo + 2**40, lo + 2**62]
    assert len({tuple(torch.randn(8, generator=g).tolist()) for g in generators(seeds)}) == 1  # the defect
    draws = [torch.randn(8, generator=g) for g in secret_generators(seeds)]
    assert len({tuple(d.tolist()) for d in draws}) == len(seeds)
    assert [g.initial_seed() for g in secret_generators(seeds)] == seeds
    a, b = (torch.randn(8, generator=g) for g in secret_generators([seeds[1], seeds[1]]))
    assert torch.equal(a, b)
    # many seeds at once: N(0, 1), no correlation between neighbouring streams
    many = client_seeds(7, METHOD_STREAMS["fedhypevae"], np.arange(256), STREAM_STEP, 3, 4, 0)
    z = torch.stack([torch.randn(2000, generator=g) for g in secret_generators(many)]).double()
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    c = torch.corrcoef(z)
    off = c[~torch.eye(len(c), dtype=torch.bool)]
    assert float(off.abs().max()) < 0.12  # 2,000 draws: |r| ~ 0.022 each, 65,280 pairs
    # the private generators the engine and ClientRNG hand out are these
    rng = ClientRNG(3, 11)
    g = rng.generator(STREAM_STEP, 2, 5)
    ref = secret_generators(client_seeds(11, METHOD_STREAMS["fedhypevae"], [3], STREAM_STEP, 2, 5, 0))[0]
    assert torch.equal(torch.randn(16, generator=g), torch.randn(16, generator=ref))


def _splitmix64_state_words(seed: int) -> list[int]:
    """mt19937's 624 words of a private generator, written out plainly (PRIVACY.md §6): the SplitMix64 outputs at
    seed + k * golden, k = 1..312, each split into its low and high 32 bits."""
    m, golden, words = 2**64 - 1, 0x9E3779B97F4A7C15, []
    for k in range(1, 313):
        z = (seed + k * golden) & m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        z ^= z >> 31
        words += [z & 0xFFFFFFFF, z >> 32]
    return words


def test_private_generators_built_in_chunks_each_hold_their_own_seeds_state():
    """secret_generators mixes the words of many seeds at once and writes each state through one reused tensor: every
    generator (on both sides of a chunk boundary) must hold its own seed's state, as the plain construction gives it."""
    import numpy as np
    import torch

    from fedhypevae.rng import _STATE_CHUNK, client_seeds, secret_generators

    seeds = client_seeds(2**62 + 5, 9, np.arange(2 * _STATE_CHUNK + 3), 1, 2, 3)
    gens = secret_generators(seeds)
    assert len(gens) == len(seeds)
    for i in (0, 1, _STATE_CHUNK - 1, _STATE_CHUNK, 2 * _STATE_CHUNK + 2):
        state = gens[i].get_state().numpy()
        assert int(state[:8].view(np.uint64)[0]) == int(seeds[i]) == gens[i].initial_seed()
        words = state[24 : 24 + 8 * 624].view(np.uint64).tolist()
        assert words == _splitmix64_state_words(int(seeds[i])), i
    assert len({tuple(torch.randn(4, generator=g).tolist()) for g in gens}) == len(seeds)


@pytest.mark.parametrize("chunk", [2, 1024])
def test_a_trainers_release_generators_are_its_clients_own(tmp_path, monkeypatch, chunk):
    """The setup releases (class statistics, mean embeddings) take every client's generator from one vectorized call per
    block (Trainer.release_generators): they must be the generators each client's rng gives for that release, with
    secure noise (the block's secret key) and with a noise seed, made a chunk of clients at a time."""
    import torch

    from fedhypevae import trainer
    from fedhypevae.config import load_config
    from fedhypevae.trainer import Trainer

    monkeypatch.setattr(trainer, "_RELEASE_GENERATOR_CHUNK", chunk)

    for k, seed in enumerate(["privacy.noise_seed=null", "privacy.noise_seed=7"]):
        cfg = load_config("tiny", ["threads=1", seed])
        tr = Trainer(cfg, tmp_path / f"run{k}", progress=False)
        tr.setup()
        assert (len(tr.clients) > chunk) == (chunk == 2)  # several chunks (4 clients, chunks of 2), or one
        for stream, epoch in ((STREAM_STATS_RELEASE, 0), (STREAM_MMD_RELEASE, 2)):
            gens = list(tr.release_generators(stream, epoch))
            assert len(gens) == len(tr.clients)
            got = [torch.randn(6, generator=g) for g in gens]
            want = [torch.randn(6, generator=c.rng.generator(stream, 0, 0, epoch)) for c in tr.clients]
            assert all(torch.equal(a, b) for a, b in zip(got, want))
            assert len({tuple(t.tolist()) for t in got}) == len(got)
