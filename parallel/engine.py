"""Model + optimizer + one training step, for both builds (used by pretrain.trainer and the tests).

Single process (no process groups): HybridLM from pretrain/layers, torch AdamW, torch's clipping,
bf16 autocast on CUDA. Parallel (parallel.state initialised, any world size > 1): the tensor /
sequence-parallel HybridLM wrapped in megatron-core DistributedDataParallel (contiguous grad
buffers, gradient reduction overlapped with backward, `no_sync` for all but the last micro-batch)
and megatron-core's distributed optimizer (ZeRO-1: fp32 main weights and Adam state sharded over
dp; gradients reduce-scattered, parameters all-gathered after the step); gradient clipping over all
groups by megatron (norm over dp shards, tp duplicates counted once). On CUDA the parameters are
bf16 with fp32 main weights in the optimizer.
"""
from __future__ import annotations

import contextlib

import torch

from parallel import state
from pretrain.config import Config, Derived
from pretrain.model import HybridLM
from pretrain.optim import build_optimizer


class Engine:
    def __init__(self, cfg: Config, derived: Derived, device: torch.device, amp_dtype: torch.dtype | None = None,
                 *, parallel: bool | None = None, distributed_optimizer: bool = True):
        """parallel: None = whenever process groups exist; distributed_optimizer=False all-reduces
        full gradients over dp instead of reduce-scattering them (tests compare whole gradients)."""
        self.cfg, self.derived, self.device = cfg, derived, device
        self.parallel = state.is_initialized() if parallel is None else parallel
        self.model = HybridLM(cfg.model, derived, parallel=self.parallel).to(device)
        self.ddp = None
        self.amp_dtype = amp_dtype
        if not self.parallel:
            self.optimizer = build_optimizer(self.model, cfg.optim)
            return
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        mcfg = self.model.mcfg
        if mcfg.bf16:
            for p in self.model.parameters():
                p.data = p.data.to(torch.bfloat16)
            self.amp_dtype = None  # the parameters are bf16 already
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=True, use_distributed_optimizer=distributed_optimizer)
        self.ddp = DistributedDataParallel(mcfg, ddp_cfg, self.model)
        o = cfg.optim
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                            adam_beta1=o.beta1, adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.grad_clip,
                            bf16=mcfg.bf16, params_dtype=torch.bfloat16 if mcfg.bf16 else torch.float32,
                            use_distributed_optimizer=distributed_optimizer),
            [self.ddp])

    def zero_grad(self) -> None:
        if self.ddp is not None:
            self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad(set_to_none=True) if self.ddp is None else self.optimizer.zero_grad()

    def forward_backward(self, batch: dict[str, torch.Tensor], scale: float, last: bool = True) -> torch.Tensor:
        """Accumulate the gradient of one micro-batch (scaled); returns its cross-entropy (detached)."""
        amp = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype
               else contextlib.nullcontext())
        sync = self.ddp.no_sync() if (self.ddp is not None and not last) else contextlib.nullcontext()
        with sync:
            with amp:
                loss, ce = self.model.loss(batch["tokens"], batch["labels"], batch["seq_idx"],
                                           self.cfg.trainer.z_loss_coeff)
            (loss * scale).backward()
        return ce

    def finalize_grads(self) -> None:
        if self.ddp is not None:
            from parallel.grads import finalize_grads

            finalize_grads(self.ddp, self.model)

    def step(self, lr: float) -> torch.Tensor:
        """finalize gradients, clip, update, zero; returns the gradient norm before clipping."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.ddp is None:
            max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            self.optimizer.step()
        else:
            self.finalize_grads()
            ok, grad_norm, _ = self.optimizer.step()
            grad_norm = torch.tensor(float(grad_norm if grad_norm is not None else 0.0))
        self.zero_grad()
        return grad_norm

    def update_expert_bias(self) -> list[torch.Tensor]:
        return [layer.update_expert_bias() for layer in self.model.moe_layers()]
