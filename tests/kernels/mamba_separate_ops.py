"""The Mamba mixer core through the separate dispatching ops (conv1d, SSD, gated norm on views of the
packed projection; autograd joins the gradients of the views with cats): what kernels.mamba_inner
fuses, the comparison for its tests (interp_cases.py, test_kern_mamba_inner_gpu.py)."""
import kernels
from kernels.mamba_inner.reference import split_packed, split_xbc


def mamba_core_separate_ops(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, *, dims, chunk_size, dt_limit,
                            norm_eps, norm_before_gate, seq_idx=None, recompute_conv=False, recompute_states=False):
    """Same signature and result as kernels.mamba_inner.op.mamba_inner (without return_y)."""
    z, xBC, dt = split_packed(zxbcdt, dims)
    conv_source = (xBC, conv_weight, conv_bias, "silu") if recompute_conv else None
    xbc = kernels.causal_conv1d(xBC, conv_weight, conv_bias, seq_idx=seq_idx, activation="silu")
    x, B, C = split_xbc(xbc, dims)
    y = kernels.ssd_scan(x, dt, A, B, C, chunk_size=chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True,
                         dt_limit=dt_limit, seq_idx=seq_idx, conv_source=conv_source, recompute_states=recompute_states)
    return kernels.rmsnorm_gated(y.reshape(z.shape), z, norm_weight, group_size=dims.d_inner // dims.ngroups,
                                 eps=norm_eps, norm_before_gate=norm_before_gate)
