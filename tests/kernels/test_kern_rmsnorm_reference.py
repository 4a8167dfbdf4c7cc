"""The gated grouped RMSNorm reference against a direct per-group formula."""

import pytest
import torch
import torch.nn.functional as F

from kernels.rmsnorm_gated.reference import rmsnorm_gated


def direct(y, z, w, gs, eps, before):
    y, z, w = y.double(), (z.double() if z is not None else None), w.double()
    out = torch.empty_like(y)
    for g0 in range(0, y.shape[-1], gs):
        sl = slice(g0, g0 + gs)
        v = y[..., sl] if (z is None or before) else y[..., sl] * F.silu(z[..., sl])
        r = v / torch.sqrt((v * v).sum(-1, keepdim=True) / gs + eps) * w[sl]
        if z is not None and before:
            r = r * F.silu(z[..., sl])
        out[..., sl] = r
    return out


@pytest.mark.parametrize("gs", [4, 8, 24])
@pytest.mark.parametrize("before", [False, True])
@pytest.mark.parametrize("with_z", [False, True])
def test_matches_direct(gs, before, with_z):
    y = torch.randn(2, 5, 24, dtype=torch.float64)
    z = torch.randn(2, 5, 24, dtype=torch.float64) if with_z else None
    w = torch.randn(24, dtype=torch.float64)
    out = rmsnorm_gated(y, z, w, group_size=gs, eps=1e-5, norm_before_gate=before)
    torch.testing.assert_close(out, direct(y, z, w, gs, 1e-5, before), rtol=1e-12, atol=1e-12)


def test_dtype_preserved():
    y = torch.randn(3, 16, dtype=torch.bfloat16)
    out = rmsnorm_gated(y, torch.randn_like(y), torch.ones(16), group_size=8)
    assert out.dtype == torch.bfloat16


def test_bad_group_raises():
    with pytest.raises(ValueError, match="group_size"):
        rmsnorm_gated(torch.randn(2, 10), None, torch.ones(10), group_size=4)
