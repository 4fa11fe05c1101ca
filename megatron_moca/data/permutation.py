"""A pseudo-random permutation of 0..n-1 evaluated one index at a time, in O(1) memory and time.

The stage-1 loader reads sample `permute(p)` at position p of an epoch, so consecutive steps read
samples from anywhere in a source (any shard, any input file) while the plan stays a pure function of
(seed, source, epoch, position): nothing to store, exact resume. A 4-round balanced Feistel network
on the smallest even bit width covering n is a bijection on [0, 2^bits); indices that land at or past
n are walked on through it again (cycle walking, < 4 rounds trips on average), which keeps it a
bijection on [0, n). Mixing by splitmix64 (Steele et al., "Fast splittable pseudorandom number
generators", 2014).
"""

from __future__ import annotations

_M64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class IndexPermutation:
    """permutation(i) for i in [0, n): a bijection chosen by `key` (any tuple of ints)."""

    ROUNDS = 4

    def __init__(self, n: int, *key: int):
        if n < 1:
            raise ValueError("a permutation needs n >= 1")
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask = (1 << self.half) - 1
        seed = 0
        for part in key:
            seed = splitmix64(seed ^ (part & _M64))
        self.keys = [splitmix64(seed + r) for r in range(self.ROUNDS)]

    def _encrypt(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (splitmix64(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"{i} outside 0..{self.n - 1}")
        x = self._encrypt(i)
        while x >= self.n:
            x = self._encrypt(x)
        return x
