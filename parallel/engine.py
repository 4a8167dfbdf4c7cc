"""Model + optimizer + one training step, for both builds (used by pretrain.trainer and the tests).

Single process (no process groups): HybridLM from pretrain/layers, torch AdamW, torch's clipping, bf16
autocast on CUDA, the head + cross-entropy in chunks of trainer.loss_chunk_tokens tokens
(pretrain/chunked_loss.py), the Linear layers' weight gradients summed inside their GEMMs
(trainer.gradient_accumulation_fusion, pretrain/layers/linear.py), the residual stream in the autocast dtype
or, with trainer.residual_in_fp32=true, in float32. Parallel (parallel.state initialised,
any world size > 1): the tensor / sequence-parallel HybridLM wrapped in megatron-core
DistributedDataParallel (contiguous grad buffers, gradient reduction overlapped with backward, `no_sync`
for all but the last micro-batch) and megatron-core's distributed optimizer (ZeRO-1: fp32 main weights
and Adam state sharded over dp; gradients reduce-scattered, parameters all-gathered after the step);
gradient clipping over all groups (megatron's norm over dp shards, with every tp replica counted once:
parallel.grads). Context parallelism needs nothing here: megatron DDP and the distributed optimizer
reduce and shard over its dp x cp group (parameters are replicated over cp) and parallel/model.py scales
the loss for it. On CUDA the parameters are bf16 with fp32 main weights in the optimizer.
`trainer.compile` compiles each residual block in both builds (megatron's tensor-parallel functions and
the collectives inside a block included).
"""
from __future__ import annotations

import contextlib

import torch

from parallel import state
from parallel.grads import clipped_norm_step
from pretrain.chunked_loss import resolve_chunk_tokens
from pretrain.config import Config, Derived
from pretrain.layers.linear import FusedLinears, fusion_enabled
from pretrain.model import HybridLM
from pretrain.optim import build_optimizer
from pretrain.recompute import apply_policy, parse_policy


class Engine:
    def __init__(self, cfg: Config, derived: Derived, device: torch.device, amp_dtype: torch.dtype | None = None,
                 *, parallel: bool | None = None, distributed_optimizer: bool = True):
        """parallel: None = whenever process groups exist; distributed_optimizer=False all-reduces
        full gradients over dp instead of reduce-scattering them (tests compare whole gradients)."""
        self.cfg, self.derived, self.device = cfg, derived, device
        self.parallel = state.is_initialized() if parallel is None else parallel
        self.pipeline = self.parallel and state.pp_size() > 1
        self.ddp = None
        self.amp_dtype = amp_dtype
        if self.pipeline:  # this pipeline rank's model chunks (parallel/pipeline.py)
            from parallel.model import ParallelHybridLM
            from parallel.pipeline import ModelChunks, chunk_placements

            reference = HybridLM(cfg.model, derived, parallel=False).state_dict()  # single-process init
            self.chunks = [ParallelHybridLM(cfg.model, derived, layers=layers, pre_process=pre, post_process=post,
                                            reference_state=reference).to(device)
                           for layers, pre, post in chunk_placements(derived)]
            del reference
            self.model = self.chunks[0] if len(self.chunks) == 1 else ModelChunks(self.chunks)
        else:
            self.model = HybridLM(cfg.model, derived, parallel=self.parallel).to(device)
            self.chunks = [self.model]
        apply_policy(self.chunks, parse_policy(cfg.trainer.recompute))
        if cfg.trainer.compile:  # each residual block of every chunk; the Triton kernels are opaque custom ops
            for chunk in self.chunks:
                for block in chunk.blocks():
                    block.compile()
        chunk_tokens = resolve_chunk_tokens(cfg.trainer.loss_chunk_tokens, device)
        for chunk in self.chunks:  # the parallel build chunks its loss at tp = cp = 1 only (ParallelHybridLM.loss)
            chunk.loss_chunk_tokens = chunk_tokens
        self.fused_linears = None  # gradient accumulation fusion (single-process engine only)
        if not self.parallel:
            if not cfg.trainer.residual_in_fp32 and amp_dtype is not None:
                self.model.residual_dtype = amp_dtype
            self.optimizer = build_optimizer(self.model, cfg.optim)
            if fusion_enabled(cfg.trainer.gradient_accumulation_fusion, device, derived.grad_accum_steps):
                self.fused_linears = FusedLinears(self.model)
            return
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        import logging

        logging.getLogger("megatron.core").setLevel(logging.WARNING)  # it lists every parameter at INFO
        mcfg = self.chunks[0].mcfg
        if mcfg.bf16:
            for p in self.model.parameters():
                p.data = p.data.to(torch.bfloat16)
            self.amp_dtype = None  # the parameters are bf16 already
        # tied embeddings under pp: the stages' local gradients of the shared weight are summed before
        # the dp reduction (finalize_grads), so that reduction is not overlapped with the backward there
        self.tied_pipeline = self.pipeline and cfg.model.tie_embeddings
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=not self.tied_pipeline,
            use_distributed_optimizer=distributed_optimizer)
        self.ddp_chunks = [DistributedDataParallel(chunk.mcfg, ddp_cfg, chunk, disable_bucketing=i > 0)
                           for i, chunk in enumerate(self.chunks)]
        self.ddp = self.ddp_chunks[0]
        if self.pipeline:  # the schedules switch gradient reduction off until each chunk's last micro-batch
            mcfg.no_sync_func = ([d.no_sync for d in self.ddp_chunks] if len(self.ddp_chunks) > 1
                                 else self.ddp.no_sync)
        # parameters are replicated over dp and cp: megatron reduces (and the distributed optimizer
        # shards) over parallel_state.get_data_parallel_group(with_context_parallel=True)
        replicas = state.dp_size() * state.cp_size()
        if self.ddp.dp_cp_group.size() != replicas:
            raise RuntimeError(f"megatron DDP reduces over {self.ddp.dp_cp_group.size()} ranks, expected dp*cp={replicas}")
        o = cfg.optim
        self.optimizer = CheckpointableOptimizer(get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                            adam_beta1=o.beta1, adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.grad_clip,
                            bf16=mcfg.bf16, params_dtype=torch.bfloat16 if mcfg.bf16 else torch.float32,
                            use_distributed_optimizer=distributed_optimizer),
            self.ddp_chunks))
        self.optimizer.prefer_fused_adam()

    def zero_grad(self) -> None:
        if self.fused_linears is not None:  # the fused layers' buffers become .grad, dropped below
            self.fused_linears.release()
        if self.ddp is not None:
            for ddp in self.ddp_chunks:
                ddp.zero_grad_buffer()
        self.optimizer.zero_grad(set_to_none=True) if self.ddp is None else self.optimizer.zero_grad()

    def autocast(self):
        """The forward's precision context: bf16 autocast where the engine runs it, else nothing."""
        return (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype
                else contextlib.nullcontext())

    def forward_backward(self, batch: dict[str, torch.Tensor], scale: float, last: bool = True) -> torch.Tensor:
        """Accumulate the gradient of one micro-batch (scaled); returns its cross-entropy (detached).
        Not with pipeline parallelism: see forward_backward_microbatches."""
        if self.pipeline:
            raise RuntimeError("with parallel.pp > 1 use Engine.forward_backward_microbatches (all micro-batches of a step)")
        sync = self.ddp.no_sync() if (self.ddp is not None and not last) else contextlib.nullcontext()
        if self.parallel:  # megatron's router sends the aux-loss gradient itself, weighted as the loss
            from parallel.moe import set_aux_loss_scale

            set_aux_loss_scale(scale * state.cp_size(), self.device)
        if self.fused_linears is not None:
            self.fused_linears.attach(self.amp_dtype)
        with sync:
            with self.autocast():
                loss, ce = self.model.loss(batch["tokens"], batch["labels"], batch["seq_idx"],
                                           self.cfg.trainer.z_loss_coeff)
            (loss * scale).backward()
        return ce

    def forward_backward_microbatches(self, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Accumulate the gradient of one optimizer step's micro-batches of this dp rank, each scaled
        by 1/len(batches) (the mean, as a loop of forward_backward(batch, 1/len) does); returns the mean
        cross-entropy over them (detached, on every rank). With pp > 1 they go through megatron-core's
        pipeline schedule (1F1B, interleaved with virtual_pp)."""
        if not self.pipeline:
            ce = torch.zeros((), device=self.device)
            for i, batch in enumerate(batches):
                ce += self.forward_backward(batch, 1.0 / len(batches), last=i == len(batches) - 1)
            return ce / len(batches)
        from parallel.pipeline import run_schedule

        if self.amp_dtype is not None:
            raise RuntimeError("pipeline parallelism runs bf16 parameters (CUDA) or float32, not autocast")
        return run_schedule(self.ddp_chunks, self.chunks, batches, self.cfg.data.seq_len,
                            self.cfg.trainer.z_loss_coeff)

    @torch.no_grad()
    def eval_cross_entropy(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The cross-entropy of one micro-batch without gradients (evaluation), on every rank; with
        pp > 1 through the pipeline schedule, forward only."""
        if not self.pipeline:
            with self.autocast():
                return self.model.loss(batch["tokens"], batch["labels"], batch["seq_idx"])[1]
        from parallel.pipeline import run_schedule

        return run_schedule(self.ddp_chunks, self.chunks, [batch], self.cfg.data.seq_len,
                            self.cfg.trainer.z_loss_coeff, forward_only=True)

    def finalize_grads(self) -> None:
        if self.ddp is not None:
            from parallel.grads import finalize_grads

            if self.tied_pipeline:
                from parallel.pipeline import sum_tied_embedding_grads

                sum_tied_embedding_grads(self.chunks)
            for ddp, chunk in zip(self.ddp_chunks, self.chunks):
                finalize_grads(ddp, chunk)

    def step(self, lr: float) -> torch.Tensor:
        """finalize gradients, clip, update, zero; returns the gradient norm before clipping."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if "wd_mult" in group:  # megatron's groups: no decay on 1-D params and biases (wd_mult 0),
                # applied by its scheduler in Megatron-LM; torch's Adam reads group["weight_decay"]
                group["weight_decay"] = self.cfg.optim.weight_decay * group["wd_mult"]
        if self.ddp is None:
            if self.fused_linears is not None:
                self.fused_linears.release()
            max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            self.optimizer.step()
        else:
            self.finalize_grads()
            _, grad_norm = clipped_norm_step(self.optimizer.optimizer, list(self.model.parameters()),
                                             self.cfg.optim.grad_clip)
        self.zero_grad()
        return grad_norm

    def update_expert_bias(self) -> list[torch.Tensor]:
        """Per MoE layer (in layer order, all pipeline stages), the load (routed slots per expert over
        the global batch, dropped or not) since the last call; applies the sigmoid router's bias update."""
        return self._per_moe_layer(lambda layer: layer.update_expert_bias())

    def take_dropped_tokens(self) -> list[torch.Tensor]:
        """Per MoE layer, slots dropped over capacity per expert (global batch) since the last call."""
        return self._per_moe_layer(lambda layer: layer.take_dropped_tokens())

    def _per_moe_layer(self, fn) -> list[torch.Tensor]:
        if not self.pipeline:
            return [fn(layer) for layer in self.model.moe_layers()]
        # each pipeline stage has its own layers; the values of all stages, in layer order, on every rank
        from parallel.pipeline import moe_loads_by_layer

        return moe_loads_by_layer(self.chunks, [[fn(layer) for layer in chunk.moe_layers()] for chunk in self.chunks])


class CheckpointableOptimizer:
    """megatron-core's optimizer, with a sharded_state_dict that reshards over tp and dp by default.

    `sharded_state_dict(model_sharded_state_dict, is_loading=False, metadata=None)`: megatron's
    default format ("fully_sharded_model_space") needs flattened ShardedTensors that megatron-core
    0.16.1's dist_checkpointing rejects, so "fully_reshardable" is the default here (gathered over
    dp through the gloo group, hence also on CPU). Before a load into an optimizer that has not
    stepped yet, its Adam state (step, exp_avg, exp_avg_sq) is created as zeros: megatron's torch-Adam
    fallback has no step entry until the first step. Everything else is the wrapped optimizer's.
    """

    DEFAULT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                        "distrib_optim_fully_reshardable_mem_efficient": True}

    def __init__(self, optimizer):
        self.__dict__["optimizer"] = optimizer
        for opt in self._chained():
            if _is_empty(opt):
                opt.state_dict = self._empty_state_dict_fn(opt)

    def __getattr__(self, name):
        return getattr(self.optimizer, name)

    def __setattr__(self, name, value):
        setattr(self.optimizer, name, value)

    def _chained(self) -> list:
        return list(getattr(self.optimizer, "chained_optimizers", [self.optimizer]))

    def _inner_torch_optimizers(self):
        return [opt.optimizer for opt in self._chained() if getattr(opt, "optimizer", None) is not None]

    @torch.no_grad()
    def prefer_fused_adam(self, fused_devices: tuple[str, ...] = ("cuda",)) -> None:
        """Run each inner torch Adam as build_optimizer runs the single-process one: fused (one kernel
        per device and dtype for all parameters) where every parameter is a float32 tensor on a
        device in `fused_devices`, foreach elsewhere. megatron-core builds torch's Adam without
        apex or TransformerEngine with neither option set, i.e. foreach on CUDA and a per-tensor loop
        on the CPU. Called once built and after every load: it also moves `step` entries that the
        load left on the CPU to their parameter's device, as torch's own load does for a fused
        optimizer."""
        for opt in self._inner_torch_optimizers():
            params = [p for g in opt.param_groups for p in g["params"]]
            fused = bool(params) and all(p.device.type in fused_devices and p.dtype == torch.float32 for p in params)
            for group in opt.param_groups:
                group["fused"], group["foreach"] = (True, False) if fused else (None, True)
            if fused:
                for p, st in opt.state.items():
                    step = st.get("step")
                    if torch.is_tensor(step) and (step.device != p.device or step.dtype != torch.float32):
                        st["step"] = step.to(device=p.device, dtype=torch.float32)

    def _chain_step(self) -> float:
        """The Adam step count of this rank's chain (0 before the first step)."""
        for opt in self._inner_torch_optimizers():
            for st in opt.state.values():
                if torch.is_tensor(st.get("step")) or isinstance(st.get("step"), (int, float)):
                    return float(st["step"])
        return 0.0

    def _empty_state_dict_fn(self, opt):
        """state_dict for a chained optimizer without parameters on this rank (the expert optimizer of a
        pipeline stage without MoE layers): megatron's own asserts that its Adam state holds exactly one
        step value, and an empty state holds none. Same layout as megatron's, with the chain's step."""
        def state_dict():
            inner = opt.optimizer.state_dict()
            groups = [{**{k: v for k, v in g.items() if k != "params"}, "step": self._chain_step()}
                      for g in inner["param_groups"]]
            sd = {"optimizer": {**{k: v for k, v in inner.items() if k not in ("state", "param_groups")},
                                "param_groups": groups}}
            if opt.grad_scaler:
                sd["grad_scaler"] = opt.grad_scaler.state_dict()
            return sd
        return state_dict

    @torch.no_grad()
    def _ensure_state(self) -> None:
        for opt in self._inner_torch_optimizers():
            for group in opt.param_groups:
                for p in group["params"]:
                    if not opt.state[p]:
                        opt.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                        "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, metadata: dict | None = None):
        if is_loading:
            self._ensure_state()
        metadata = {**self.DEFAULT_METADATA, **(metadata or {})}
        return self.optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading, metadata=metadata)

    def load_state_dict(self, state_dict) -> None:
        """megatron's load, except that the fully-reshardable parameter state (which holds no Adam
        `step`: that comes from the common part) is copied in while the per-parameter `step`
        entries of torch's Adam are set aside (megatron 0.16.1 expects none there without apex/TE).
        With MoE the optimizer is a chain (dense params; expert params over the expert-dp groups)
        and the state dict holds one such entry per chained optimizer ({0: ..., 1: ...}).
        Afterwards every parameter gets its own `step` tensor (see _unshare_steps), and the inner Adam
        runs fused again where it can (prefer_fused_adam)."""
        try:
            self._load_state_dict(state_dict)
        finally:
            self._unshare_steps()
            self.prefer_fused_adam()  # the load replaced the param groups (and their options)

    @torch.no_grad()
    def _unshare_steps(self) -> None:
        """megatron's load puts one `step` tensor, shared by every parameter of a param group, into
        torch Adam's state; torch increments each parameter's step in place, so a shared tensor
        would advance by the number of parameters per update and bias-correct wrongly after a resume."""
        for opt in self._inner_torch_optimizers():
            for st in opt.state.values():
                if torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].clone()

    def _load_state_dict(self, state_dict) -> None:
        chained = self._chained()
        entries = [state_dict] if len(chained) == 1 else (
            [state_dict[k] for k in sorted(state_dict)] if isinstance(state_dict, dict) else [])
        if len(entries) != len(chained) or not all(
                isinstance(sd, dict) and "param_state" in sd and sd.get("param_state_sharding_type") == "fully_reshardable"
                for sd in entries):
            self.optimizer.load_state_dict(state_dict)
            return
        step = _saved_step(entries)
        for dist_opt, sd in zip(chained, entries):
            common = {k: v for k, v in sd.items() if k not in ("param_state", "param_state_sharding_type")}
            dist_opt.load_state_dict(_with_own_param_groups(dist_opt, common, step))
        steps = {}
        for opt in self._inner_torch_optimizers():
            for p, st in opt.state.items():
                if "step" in st:
                    steps[(id(opt), p)] = (opt, st.pop("step"))
        try:
            for dist_opt, sd in zip(chained, entries):
                dist_opt.load_parameter_state_from_fully_reshardable(sd["param_state"])
        finally:
            for (_, p), (opt, step) in steps.items():
                opt.state[p]["step"] = step


def _is_empty(opt) -> bool:
    inner = getattr(opt, "optimizer", None)
    return inner is not None and not any(len(g["params"]) for g in inner.param_groups)


def _saved_step(entries: list[dict]) -> float:
    """The one Adam step count in a checkpoint's optimizer param groups (every chained optimizer
    steps together); an error naming the values when they disagree."""
    steps = {float(g["step"]) for sd in entries for g in sd["optimizer"]["param_groups"] if g.get("step") is not None}
    if len(steps) != 1:
        raise ValueError(f"the checkpoint's optimizer param groups hold step counts {sorted(steps)}; expected one")
    return steps.pop()


def _with_own_param_groups(dist_opt, common: dict, step: float) -> dict:
    """The common (non-tensor) optimizer state with one param group per group of this rank, in its
    order: the saved group with the same megatron identifiers (lr/wd multipliers, expert or not) where
    there is one, else this rank's own hyper-parameters, and the checkpoint's step everywhere. The
    common state is written by rank 0 alone, so under pipeline parallelism it holds rank 0's groups:
    another stage may have a group that stage 0 lacks (no 1-D parameters; no experts)."""
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    def ident(group):
        return tuple(group.get(k, group.get(f"pre_{k}")) for k in param_group_identifier_keys)

    saved = {ident(g): g for g in common["optimizer"]["param_groups"]}
    groups = [{**saved.get(ident(g), {k: v for k, v in g.items() if k != "params"}), "step": step}
              for g in dist_opt.optimizer.param_groups]
    return {**common, "optimizer": {**common["optimizer"], "param_groups": groups}}
