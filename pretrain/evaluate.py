"""Periodic evaluation on held-out data: mean token cross-entropy and perplexity, averaged over dp ranks.

Configured by data.validation (path or streams, as data.path/data.streams) and trainer.eval_interval
(0 = off) / trainer.eval_steps. Every eval_interval steps and after the last step, each dp rank runs
the model without gradients on `eval_steps` micro-batches of its share of the validation data, read
unshuffled from the start, so every evaluation sees the same samples (fewer batches when the data holds
fewer). The loss is the mean over all evaluated tokens of all dp ranks (full batches: every batch has
the same number of tokens, so the mean of the batch means is the token mean); perplexity = exp(loss).
Written to metrics.jsonl and TensorBoard as eval/loss, eval/perplexity, eval/tokens.

Evaluation leaves training untouched: the model's train/eval mode and the MoE load counters that drive
the expert-bias update are restored afterwards, and the training loader is not used.
"""
from __future__ import annotations

import logging
import math
import time

import torch

from pretrain.config import Config, Derived, stream_dicts
from pretrain.distributed import DistInfo

log = logging.getLogger("pretrain")


def build_eval_loader(cfg: Config, dist_info: DistInfo, derived: Derived, dp_rank: int):
    """The validation loader (unshuffled, this rank's dp share), or None without data.validation."""
    from data.dataset import build_train_loader

    v = cfg.data.validation
    if not (v.path or v.streams):
        return None
    return build_train_loader(
        v.path or None, streams=stream_dicts(v.path, v.streams), seq_len=cfg.data.seq_len,
        micro_batch_size=cfg.data.micro_batch_size, seed=cfg.run.seed, shuffle=False, num_workers=0,
        dp_rank=dp_rank, dp_size=derived.dp, vocab_size=cfg.model.vocab_size)


@torch.no_grad()
def evaluate(model, loader, num_batches: int, device: torch.device, cross_entropy, dp_group=None) -> dict:
    """{eval/loss, eval/perplexity, eval/tokens} over up to num_batches micro-batches per rank.

    `cross_entropy(batch) -> ce` of one micro-batch (Engine.eval_cross_entropy: also through the
    pipeline schedule); `model` is put in eval mode and its MoE counters restored afterwards;
    dp_group: sum over these ranks."""
    moe = [m for m in getattr(model, "moe_layers", lambda: [])()]
    saved_load = [m.tokens_per_expert.clone() for m in moe]
    was_training = model.training
    model.eval()
    ce_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    try:
        batches = iter(loader)
        for _ in range(num_batches):
            batch = next(batches, None)
            if batch is None:
                break
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            ce = cross_entropy(batch)
            n = batch["labels"].numel()
            ce_sum += ce.double() * n
            tokens += n
        del batches
    finally:
        model.train(was_training)
        for m, load in zip(moe, saved_load):
            m.tokens_per_expert.copy_(load)
    stats = torch.stack([ce_sum, tokens])
    if dp_group is not None:
        torch.distributed.all_reduce(stats, group=dp_group)
    if stats[1] == 0:
        raise RuntimeError("the validation data yields no batches: it holds fewer samples than "
                           "data.micro_batch_size x dp (data.validation)")
    loss = float(stats[0] / stats[1])
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 700.0)), "eval/tokens": int(stats[1])}


class Evaluator:
    """What trainer.fit calls after each step: evaluates when due and writes the record."""

    def __init__(self, cfg: Config, dist_info: DistInfo, derived: Derived, dp_rank: int):
        self.interval, self.num_batches = cfg.trainer.eval_interval, cfg.trainer.eval_steps
        self.total, self.is_main = derived.total_steps, dist_info.is_main
        self.loader = build_eval_loader(cfg, dist_info, derived, dp_rank) if self.interval > 0 else None
        self.last: dict | None = None  # the latest record

    def due(self, step: int) -> bool:
        return self.loader is not None and (step % self.interval == 0 or step == self.total)

    def maybe_evaluate(self, trainer) -> float:
        """Evaluate when due; returns the seconds it took (0.0 when not due)."""
        if not self.due(trainer.step):
            return 0.0
        start = time.perf_counter()
        dp_group = None
        if trainer.engine.parallel and trainer.derived.dp > 1:
            from parallel import state as parallel_state

            dp_group = parallel_state.dp_group()
        record = evaluate(trainer.model, self.loader, self.num_batches, trainer.device,
                          trainer.engine.eval_cross_entropy, dp_group)
        trainer.metrics.write(trainer.step, record)
        if self.is_main:
            log.info("eval step %d/%d | loss %.4f | perplexity %.2f | %d tokens", trainer.step, self.total,
                     record["eval/loss"], record["eval/perplexity"], record["eval/tokens"])
        self.last = record
        return time.perf_counter() - start
