import numpy as np
import pytest
import torch

from edgekv.policy import CachePolicy, KVShape
from edgekv.reference.cache import CompressedKVCache
from edgekv.rotation import hadamard


@pytest.mark.parametrize("n", [1, 2, 16, 64])
def test_hadamard_is_orthonormal_with_equal_magnitudes(n):
    h = hadamard(n)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-6)
    np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n), rtol=1e-6)
    with pytest.raises(ValueError):
        hadamard(12)


def test_rotated_cache_reads_back_the_unrotated_values():
    """Rotation spreads an outlier channel: with it, 2-bit keys and values read back
    closer to the input than without (and the read-back is in the original basis)."""
    torch.manual_seed(0)
    shape = KVShape(1, 2, 16)
    policy = CachePolicy.uniform(1, 2, sinks=0, window=16, block=8, group=8)
    x = torch.randn(1, 2, 8, 16)
    x[..., 3] *= 20  # an outlier channel
    errs = {}
    for rotate in (False, True):
        c = CompressedKVCache(policy, shape)
        if rotate:
            c.rotation = {"k": torch.from_numpy(hadamard(16)), "v": torch.from_numpy(hadamard(16))}
        c.append(0, x, x)
        c.commit(8)
        k, v = c.view(0)
        errs[rotate] = (float((k - x).norm()), float((v - x).norm()))
    assert errs[True][1] < errs[False][1]  # values: per-token groups see the outlier spread out
    assert errs[True][0] < 0.3 * float(x.norm())  # keys: read back in the original basis
