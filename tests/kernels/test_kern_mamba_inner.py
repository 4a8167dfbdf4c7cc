"""kernels.mamba_inner's argument errors (CPU, the reference path): a packed projection of the wrong
width and a conv weight of the wrong channel count are named before any work. The fused Triton
node against the separate ops and the reference: test_kern_triton_interp.py (CPU interpreter) and
test_kern_mamba_inner_gpu.py."""
import pytest
import torch

from kernels.mamba_inner.op import MambaDims, mamba_inner

DIMS = MambaDims(nheads=4, headdim=8, ngroups=2, dstate=8)  # packed width 2*32 + 2*16 + 4 = 100


def _args(width=DIMS.packed_dim, conv_dim=DIMS.conv_dim):
    return (torch.randn(2, 20, width), torch.randn(conv_dim, 4), None, torch.zeros(4), -torch.ones(4),
            torch.ones(4), torch.ones(DIMS.d_inner))


def test_the_reference_runs_and_keeps_the_shape():
    out, y = mamba_inner(*_args(), dims=DIMS, chunk_size=16, return_y=True)
    assert out.shape == y.shape == (2, 20, DIMS.d_inner)


def test_a_packed_projection_of_the_wrong_width_is_named():
    with pytest.raises(ValueError, match=r"zxbcdt must be .* \(\.\.\., 100\) .* got \(2, 20, 99\)"):
        mamba_inner(*_args(width=99), dims=DIMS, chunk_size=16)


def test_a_conv_weight_of_the_wrong_channel_count_is_named():
    with pytest.raises(ValueError, match=r"weight must be \(dim, width\) with dim=64, got \(63, 4\)"):
        mamba_inner(*_args(conv_dim=63), dims=DIMS, chunk_size=16)
