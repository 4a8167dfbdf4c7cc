"""Entry point: python -m pretrain.train --config a.yaml [--config b.yaml] [key=value ...] [--print-config].

Also the torchrun / srun entry (`torchrun --nproc-per-node N -m pretrain.train ...`).
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback

from pretrain.config import ConfigError, load_config, to_yaml, validate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pretrain.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], metavar="YAML",
                        help="config file; repeat to merge several in order")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--verify", metavar="CHECKPOINT",
                        help="check a checkpoint (or every checkpoint of a run / checkpoints dir) offline: "
                             "completion marker, sizes and checksums; exit 1 naming any bad file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotlist overrides, e.g. trainer.max_steps=100")
    return parser.parse_args(argv)


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    logging.getLogger("streaming").setLevel(logging.WARNING)  # its defaults notes are noise at every start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.verify:
        from pretrain.checkpoint import verify_main

        return verify_main(args.verify)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        from pretrain.distributed import init_distributed, shutdown_distributed

        world_size_hint = _world_size_from_env()
        derived = validate(cfg, world_size_hint)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    # before the slow start-up: a preemption signal from now on means "save at the next step, exit 42"
    from pretrain.signals import install_process_flag

    install_process_flag(cfg.checkpoint.signals)
    dist_info = init_distributed(cfg.trainer.device)
    setup_logging(dist_info.is_main)
    from pretrain.trainer import Trainer

    from pretrain.checkpoint import CheckpointError

    clean = False
    try:
        code = Trainer(cfg, derived, dist_info).fit()
        clean = True
    except CheckpointError as err:
        print(f"checkpoint error (rank {dist_info.rank}): {err}", file=sys.stderr)
        return 3
    except BaseException:
        # say what happened before teardown: the other ranks may hang in a collective until killed
        traceback.print_exc()
        sys.stderr.flush()
        raise
    finally:
        shutdown_distributed(clean)
    return code  # 0: done; 42 (pretrain.signals.REQUEUE_EXIT_CODE): checkpointed on a signal, requeue me


def _world_size_from_env() -> int:
    import os

    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if "SLURM_NTASKS" in os.environ and "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_NTASKS"])
    return 1


if __name__ == "__main__":
    sys.exit(main())
