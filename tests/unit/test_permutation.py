"""data/permutation.py: a bijection for every n, chosen by its key; and the stage-1 plan built on it
reads each epoch's samples from all over a source (not neighbours of one shard), once each."""

import pytest

from megatron_moca.data.permutation import IndexPermutation


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4099])
def test_a_bijection_on_0_to_n(n):
    p = IndexPermutation(n, 7, 1)
    assert sorted(p(i) for i in range(n)) == list(range(n))
    with pytest.raises(IndexError):
        p(n)


def test_the_key_chooses_the_permutation_and_fixes_it():
    a = [IndexPermutation(500, 1, 2)(i) for i in range(500)]
    assert a == [IndexPermutation(500, 1, 2)(i) for i in range(500)]
    assert a != [IndexPermutation(500, 1, 3)(i) for i in range(500)]
    assert a != list(range(500))


def test_the_plan_spreads_consecutive_samples_over_the_shards():
    from megatron_moca.data.loader import Source

    class Plan(Source):
        def __init__(self, order):
            self.folder, self.source_id, self.seed, self.order = "corpus", 0, 1, order
            self.names = [f"s{i}" for i in range(50)]
            self.counts = [40] * 50
            self.total = 2000
            self._epoch_cache = (-1, [], [], None)

    sequential, permuted = Plan("sequential"), Plan("permuted")
    assert len({sequential.locate(j)[0] for j in range(100)}) <= 4  # 100 neighbours: 3-4 shards
    assert len({permuted.locate(j)[0] for j in range(100)}) >= 40
    for plan in (sequential, permuted):  # each epoch visits every sample exactly once
        assert sorted(plan.locate(j) for j in range(2000, 4000)) == \
            sorted((f"corpus/s{i}", k) for i in range(50) for k in range(40))
