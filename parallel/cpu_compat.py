"""Stand-ins for the few CUDA calls megatron-core makes unconditionally, installed only without CUDA.

This is the one module in the project that patches a library. `install()` is a no-op when
`torch.cuda.is_available()`; otherwise it replaces exactly the entries of `PATCHED` and nothing else
(tests/parallel/test_cpu_compat.py pins the list). Measured needs (megatron-core 0.16.1, gloo):

- torch.cuda.current_device: megatron allocates DDP grad buffers, gather buffers for sequence
  parallelism and checkpoint scratch tensors with `device=torch.cuda.current_device()`; here it
  names the CPU.
- torch.cuda.Stream / Event / current_stream / stream / synchronize: DDP's overlapped gradient
  reduction and dist_checkpointing synchronise on streams; on CPU every op is already complete.
- the CUDA RNG tracker (`model_parallel_cuda_manual_seed`): `CudaRNGStatesTracker.add` and
  megatron's `_get_cuda_rng_state` / `_set_cuda_rng_state` read and write CUDA generator state;
  here they use CPU generator states.
- hard-coded `device="cuda"` scalars (found-inf flag, unit loss scale, grad-norm buffers) in
  megatron.core.optimizer.optimizer, megatron.core.optimizer.clip_grads and megatron.core.utils
  (its local multi-tensor l2 norm, used for the grad norm without apex): those modules see
  a `torch` whose tensor factories map device "cuda" to the CPU (every other attribute is torch's).
- the MoE all-to-all dispatcher's `maybe_move_tensor_to_cpu` (megatron.core.transformer.moe.
  token_dispatcher): it turns the split sizes into numpy only for tensors on CUDA, so on CPU they
  stay torch tensors, which gloo's all_to_all_single rejects; the stand-in returns numpy for CPU
  tensors too when numpy was asked for.
- uneven all-gather / reduce-scatter over tp (megatron.core.tensor_parallel.mappings.
  `_gather_along_first_dim` / `_reduce_scatter_along_first_dim` with split sizes: the all-to-all
  dispatcher's expert-tp step when tp > 1 and ep > 1): NCCL takes lists of unequal tensors, gloo
  does not. The stand-ins gather rows padded to the longest piece and cut them out again, and
  reduce-scatter as an all-reduce of which each rank keeps its own piece; without split sizes
  they call megatron's own functions.
- the pipeline schedules' token counter (megatron.core.pipeline_parallel.schedules), a hard-coded
  `torch.zeros([], dtype=torch.int, device="cuda")`: that module sees the same factory-mapping
  `torch`. (The p2p buffers use torch.cuda.current_device, above; `batch_p2p_sync` is off on the
  CPU in parallel.common.megatron_config.)
- `Tensor.type() == "torch.cuda.FloatTensor"` checks: DistributedOptimizer.__init__ sorts parameters
  by that string (its stand-in lets each parameter report the CUDA type name while it is built), and
  clip_grad_by_total_norm_fp32 asserts it (its stand-in is the same scaling without the assert).
"""
from __future__ import annotations

import contextlib

import torch

PATCHED = (
    "torch.cuda.current_device",
    "torch.cuda.Stream",
    "torch.cuda.Event",
    "torch.cuda.current_stream",
    "torch.cuda.stream",
    "torch.cuda.synchronize",
    "megatron.core.tensor_parallel.random.CudaRNGStatesTracker.add",
    "megatron.core.tensor_parallel.random._get_cuda_rng_state",
    "megatron.core.tensor_parallel.random._set_cuda_rng_state",
    "megatron.core.optimizer.optimizer.torch",
    "megatron.core.optimizer.clip_grads.torch",
    "megatron.core.utils.torch",
    "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.__init__",
    "megatron.core.optimizer.optimizer.clip_grad_by_total_norm_fp32",
    "megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu",
    "megatron.core.tensor_parallel.mappings._gather_along_first_dim",
    "megatron.core.tensor_parallel.mappings._reduce_scatter_along_first_dim",
    "megatron.core.pipeline_parallel.schedules.torch",
)

_installed = False


class _Stream:
    """A CUDA stream stand-in: CPU work is synchronous, so waiting and recording do nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event if event is not None else _Event()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _Event:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


_DEFAULT_STREAM = _Stream()


def _current_device():
    return torch.device("cpu")


def _current_stream(device=None):
    return _DEFAULT_STREAM


@contextlib.contextmanager
def _stream(stream=None):
    yield


def _synchronize(device=None) -> None:
    pass


def _tracker_add(self, name, seed):
    """CudaRNGStatesTracker.add on CPU: a named CPU generator state seeded with `seed`."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"rng state {name} already exists")
    self.states_[name] = torch.Generator().manual_seed(seed).get_state()


def _get_rng_state(device=None, clone=False, graph_safe=False):
    return torch.get_rng_state()


def _set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


class _CpuFactoriesTorch:
    """`torch` as seen by one megatron module: tensor factories put device="cuda" tensors on the CPU."""

    _FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "zeros_like", "ones_like", "empty_like")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name not in self._FACTORIES:
            return attr

        def factory(*args, **kwargs):
            device = kwargs.get("device")
            if device is not None and torch.device(device).type == "cuda":
                kwargs["device"] = "cpu"
            return attr(*args, **kwargs)

        return factory


def _with_cuda_type_names(init):
    def __init__(self, optimizer, *args, **kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for p in params:
            p.type = _cuda_type_reporter(p)
        try:
            init(self, optimizer, *args, **kwargs)
        finally:
            for p in params:
                del p.type

    return __init__


def _cuda_type_reporter(tensor):
    def type_(*args, **kwargs):
        if args or kwargs:
            return torch.Tensor.type(tensor, *args, **kwargs)
        return torch.Tensor.type(tensor).replace("torch.", "torch.cuda.", 1)

    return type_


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
    """maybe_move_tensor_to_cpu for tensors that are on the CPU already: numpy when asked for."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.detach().cpu().numpy()
    return tensor


def _uneven_gather(original):
    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        longest = max(sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        pieces = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(pieces, padded.contiguous(), group=group)
        return torch.cat([piece[:n] for piece, n in zip(pieces, sizes)])

    return gather


def _uneven_reduce_scatter(original):
    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return original(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        sizes = [int(n) for n in input_split_sizes]
        rank = group.rank()
        start = sum(sizes[:rank])
        return total[start:start + sizes[rank]].clone()

    return reduce_scatter


def install() -> bool:
    """Install the stand-ins when CUDA is unavailable (idempotent). Returns whether they are active."""
    global _installed
    if torch.cuda.is_available():
        return False
    if _installed:
        return True
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = _current_device
    torch.cuda.Stream = _Stream
    torch.cuda.Event = _Event
    torch.cuda.current_stream = _current_stream
    torch.cuda.stream = _stream
    torch.cuda.synchronize = _synchronize
    mrandom.CudaRNGStatesTracker.add = _tracker_add
    mrandom._get_cuda_rng_state = _get_rng_state
    mrandom._set_cuda_rng_state = _set_rng_state
    from megatron.core.optimizer import clip_grads, optimizer

    from megatron.core.optimizer import distrib_optimizer

    optimizer.torch = _CpuFactoriesTorch()
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    DistOpt = distrib_optimizer.DistributedOptimizer
    DistOpt.__init__ = _with_cuda_type_names(DistOpt.__init__)
    clip_grads.torch = _CpuFactoriesTorch()
    import megatron.core.utils as mutils

    mutils.torch = _CpuFactoriesTorch()
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.maybe_move_tensor_to_cpu = _move_tensor_to_cpu
    from megatron.core.tensor_parallel import mappings

    mappings._gather_along_first_dim = _uneven_gather(mappings._gather_along_first_dim)
    mappings._reduce_scatter_along_first_dim = _uneven_reduce_scatter(mappings._reduce_scatter_along_first_dim)
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _CpuFactoriesTorch()
    _installed = True
    return True


def installed() -> bool:
    return _installed
