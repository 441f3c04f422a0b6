"""Fuzzing every weight loader with mutated valid files: only WeightsError or a working object may come out.

The long run is ``python bench/fuzz_weights.py --cases 10000``.
"""
from weight_fuzz import MUTATIONS, run_fuzz

CASES = 1200


def test_fuzz_mutated_files_raise_only_weights_error(tmp_path):
    """≥1,000 mutated banks (SD1.5, SDXL, tiny), embeddings, style encoders and LoRAs: no crash, no other exception type, no slow case."""
    result = run_fuzz(CASES, tmp_path, seed=12345)
    report = "\n\n".join(f"case {c} ({kind}, {mutation}):\n{tb}" for c, kind, mutation, tb in result.failures[:3])
    assert not result.failures, f"{len(result.failures)} cases raised something other than WeightsError:\n{report}"
    assert result.cases == CASES == result.loaded + result.rejected
    assert result.rejected > CASES // 2  # the mutations really do break files...
    assert result.loaded > 20  # ...and harmless ones (e.g. flipped bits in data) still load and work
    assert set(result.by_mutation) == set(MUTATIONS)
    assert result.slowest_s < 10.0  # nothing hangs (typical slowest case: tens of ms)


def test_fuzz_is_reproducible(tmp_path):
    a = run_fuzz(60, tmp_path / "a", seed=7)
    b = run_fuzz(60, tmp_path / "b", seed=7)
    assert (a.loaded, a.rejected, a.by_mutation) == (b.loaded, b.rejected, b.by_mutation)
