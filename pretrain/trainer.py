"""The training loop: data, model, optimizer, schedule, gradient accumulation, logging.

One optimizer step consumes `data.global_batch_size` samples: `grad_accum_steps` micro-batches of
`data.micro_batch_size` on each of the dp ranks. bf16 autocast on CUDA, float32 on CPU.
"""
from __future__ import annotations

import logging
import os
import random
import time

import numpy as np
import torch

import kernels.backend
from pretrain.config import Config, ConfigError, Derived, stream_dicts, to_yaml
from pretrain.evaluate import Evaluator
from pretrain.distributed import DistInfo, init_single_rank_group
from pretrain.flops import device_peak_tflops, train_flops_per_token
from pretrain.metrics import MetricsWriter, memory_gb, progress_line
from parallel.engine import Engine
from pretrain.schedule import lr_at
from data.dataset import infinite_batches

log = logging.getLogger("pretrain")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    precision = cfg.trainer.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def build_data(cfg: Config, dist_info: DistInfo, derived: Derived):
    from data.dataset import build_train_loader

    _check_canonical_nodes(cfg.data.num_canonical_nodes, dist_info.world_size)

    if cfg.data.demo_corpus:
        from data.demo import ensure_demo_data

        if dist_info.is_main:
            ensure_demo_data(cfg.data.path, cfg.data.seq_len, tokenizer=cfg.data.tokenizer)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    return build_train_loader(
        cfg.data.path or None, streams=stream_dicts(cfg.data.path, cfg.data.streams), seq_len=cfg.data.seq_len, micro_batch_size=cfg.data.micro_batch_size,
        seed=cfg.run.seed, shuffle=cfg.data.shuffle, num_workers=cfg.data.num_workers,
        dp_rank=_dp_rank(dist_info, derived), dp_size=derived.dp,
        vocab_size=cfg.model.vocab_size, num_canonical_nodes=cfg.data.num_canonical_nodes,
    )


def _check_canonical_nodes(canonical: int | None, world_size: int) -> None:
    """streaming partitions samples over canonical nodes, then over the physical ones (world size /
    LOCAL_WORLD_SIZE): one count must divide the other (else streaming fails at the first batch)."""
    nodes = max(1, world_size // int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    if canonical is not None and canonical % nodes and nodes % canonical:
        raise ConfigError(f"data.num_canonical_nodes={canonical}: must divide, or be a multiple of, the "
                          f"number of nodes of this run ({nodes})")


def _dp_rank(dist_info: DistInfo, derived: Derived) -> int:
    """This rank's data-parallel index: from the process groups when they exist (any rank order:
    the loader places the rank at this replica); else pure data parallelism over consecutive ranks."""
    from parallel import state as parallel_state

    if parallel_state.is_initialized():
        return parallel_state.dp_rank()
    return dist_info.rank // (derived.world_size // derived.dp)


def configure_kernels(cfg: Config) -> None:
    """Apply `kernels.*` to this process: the backend and the deterministic launch configs; and
    `trainer.deterministic`, which implies `kernels.deterministic`."""
    kernels.backend.set_backend(cfg.kernels.backend)
    kernels.backend.set_deterministic(cfg.kernels.deterministic or cfg.trainer.deterministic)
    if cfg.trainer.deterministic:
        use_deterministic_torch()


def use_deterministic_torch() -> None:
    """torch's side of `trainer.deterministic`, for this process. CUBLAS_WORKSPACE_CONFIG is read
    when cuBLAS starts, so it is set here (unless the user set it) before the first matmul."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config, "deterministic"):  # where this torch has it: no on-device benchmarking
        inductor_config.deterministic = True


class Trainer:
    def __init__(self, cfg: Config, derived: Derived, dist_info: DistInfo):
        self.cfg, self.derived, self.dist = cfg, derived, dist_info
        self.device = dist_info.device
        self.amp_dtype = autocast_dtype(cfg, self.device)
        configure_kernels(cfg)
        seed_everything(cfg.run.seed)
        os.makedirs(derived.run_dir, exist_ok=True)
        if dist_info.is_main:
            for sub in ("logs", "checkpoints"):
                os.makedirs(os.path.join(derived.run_dir, sub), exist_ok=True)
            with open(os.path.join(derived.run_dir, "config.yaml"), "w") as f:
                f.write(to_yaml(cfg))

        if dist_info.world_size > 1 or cfg.trainer.engine == "megatron":
            # tp/pp/ep/cp/dp groups (sizes were validated for this world size)
            from parallel import state as parallel_state

            init_single_rank_group(self.device)  # only when no launcher made a group
            parallel_state.initialize(cfg, derived)
        # single process: pretrain/layers + torch AdamW; parallel: megatron DDP + distributed optimizer
        self.engine = Engine(cfg, derived, self.device, self.amp_dtype)
        self.model, self.optimizer = self.engine.model, self.engine.optimizer
        self.loader = build_data(cfg, dist_info, derived)
        self.batches = infinite_batches(self.loader)
        self.evaluator = Evaluator(cfg, dist_info, derived, _dp_rank(dist_info, derived))
        self.metrics = MetricsWriter(derived.run_dir, enabled=dist_info.is_main)
        self.step = 0
        self.consumed_samples = 0
        self.flops_per_token = train_flops_per_token(cfg, derived)
        self.peak_tflops = device_peak_tflops(self.device)
        self.params = self.model.num_parameters()  # global counts, the same at any tp
        if dist_info.is_main:
            log.info("model: %s parameters (%s active), pattern %s, %d layers; %.3g training FLOPs/token",
                     f"{self.params['total']:,}", f"{self.params['active']:,}", cfg.model.pattern,
                     len(derived.layer_kinds), self.flops_per_token)
            log.info("run directory: %s; %d steps of %d tokens; device %s, %s", derived.run_dir,
                     derived.total_steps, derived.tokens_per_step, self.device,
                     "bf16 autocast" if self.amp_dtype else "float32")

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = next(self.batches)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def forward_backward(self, batch: dict[str, torch.Tensor], scale: float, last: bool = True) -> torch.Tensor:
        """Accumulate one micro-batch's gradient (x scale); `last` lets DDP reduce (overlapped)."""
        return self.engine.forward_backward(batch, scale, last=last)

    def train_step(self) -> dict:
        cfg = self.cfg
        lr = lr_at(self.step, self.derived.total_steps, cfg.optim)
        accum = self.derived.grad_accum_steps
        if self.engine.pipeline:  # all micro-batches of the step through the pipeline schedule (parallel.pp > 1)
            loss = self.engine.forward_backward_microbatches([self.next_batch() for _ in range(accum)])
        else:
            ce_sum = torch.zeros((), device=self.device)
            for i in range(accum):
                ce_sum += self.forward_backward(self.next_batch(), 1.0 / accum, last=i == accum - 1)
        grad_norm = self.engine.step(lr)  # dp/tp/pp gradient sync, clipping over all groups, update
        moe_load = self.engine.update_expert_bias()
        moe_dropped = self.engine.take_dropped_tokens()
        if not self.engine.pipeline:
            loss = ce_sum / accum
        if self.engine.parallel and self.derived.dp > 1:  # log the global batch's loss
            from parallel import state as parallel_state

            torch.distributed.all_reduce(loss, group=parallel_state.dp_group())
            loss = loss / self.derived.dp
        self.step += 1
        self.consumed_samples += cfg.data.global_batch_size
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "moe_load": moe_load,
                "moe_dropped": moe_dropped}

    def make_record(self, out: dict, step_time: float) -> dict:
        tokens_per_s = self.derived.tokens_per_step / step_time
        world = self.derived.world_size
        tflops = self.flops_per_token * tokens_per_s / world / 1e12
        record = {
            "loss": float(out["loss"]), "lr": out["lr"], "grad_norm": float(out["grad_norm"]),
            "tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": tokens_per_s / world,
            "tflops_per_gpu": tflops, "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
            "memory_gb": memory_gb(self.device), "step_time_s": step_time,
            "eta_s": step_time * (self.derived.total_steps - self.step),
            "consumed_samples": self.consumed_samples, "consumed_tokens": self.consumed_samples * self.cfg.data.seq_len,
        }
        for i, load in enumerate(out["moe_load"]):
            record[f"moe_load/layer{i}"] = [float(x) for x in load.tolist()]
        if self.cfg.model.moe.capacity_factor is not None:
            for i, dropped in enumerate(out.get("moe_dropped", [])):
                record[f"moe_dropped/layer{i}"] = [float(x) for x in dropped.tolist()]
        return record

    def fit(self) -> int:
        """Train to total_steps, resuming per checkpoint.resume and saving per checkpoint.*.

        Returns 0 when training is complete, or REQUEUE_EXIT_CODE (42) after a signal (SIGUSR1/SIGTERM,
        checkpoint.signals) made every rank save a checkpoint at the next step boundary."""
        from pretrain.checkpoint import REQUEUE_EXIT_CODE, Checkpointer

        total = self.derived.total_steps
        self.checkpointer = ckpt = Checkpointer(self.cfg, self.derived, self.dist)
        ok = False
        try:
            ckpt.resume(self)
            window_start, window_steps = time.perf_counter(), 0
            while True:
                if ckpt.at_step_boundary(self):
                    ok = True
                    return REQUEUE_EXIT_CODE
                if self.step >= total:
                    break
                out = self.train_step()
                window_steps += 1
                if self.step % self.cfg.trainer.log_interval == 0 or self.step in (1, total):
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    now = time.perf_counter()
                    record = self.make_record(out, (now - window_start) / window_steps)
                    self.metrics.write(self.step, record)
                    if self.dist.is_main:
                        log.info(progress_line({"step": self.step, **record}, total))
                    window_start, window_steps = now, 0
                window_start += self.evaluator.maybe_evaluate(self)  # seconds: eval time is not step time
            ckpt.finish(self)
            ok = True
            return 0
        finally:
            ckpt.close(abort=not ok)
            self.metrics.close()
