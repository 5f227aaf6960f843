"""The public seed tags: one registered tag per public use of the seed, distinct, and never renumbered."""

from __future__ import annotations

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
