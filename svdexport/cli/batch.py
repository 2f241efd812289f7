"""`svdexport batch ENGINE --prompts FILE`: a prompt or class list across Ray workers, resumable (batch/)."""

from __future__ import annotations

import argparse

from svdexport.cli.common import add_engine, add_trust_args, apply_trust_args
from svdexport.cli.run import add_lora
from svdexport.errors import SvdExportError


def add_batch(p: argparse.ArgumentParser) -> None:
    add_engine(p, " (the same path on every node)")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="one prompt per line (a class name per line for class-conditioned engines)")
    p.add_argument("--out", required=True, help="output folder: NNNNNN.png + NNNNNN.json per item, metadata.jsonl")
    p.add_argument("--seed", type=int, default=0, help="item i uses seed + i")
    p.add_argument("--steps", type=int, help="sampling steps (default: the engine's)")
    p.add_argument("--guidance-scale", type=float, default=3.5, help="for engines with text encoders")
    add_lora(p)
    g = p.add_argument_group("Ray")
    g.add_argument("--workers", type=int, default=1, help="Ray actors, each loading the engine once (default 1)")
    g.add_argument("--address", help="Ray cluster to join (e.g. auto, ray://head:10001); default: start a local one")
    g.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs each actor reserves (1 on a GPU cluster)")
    add_trust_args(p)
    p.set_defaults(func=cmd_batch)


def cmd_batch(a: argparse.Namespace) -> None:
    from svdexport.batch.runner import BatchOptions, run

    keys = apply_trust_args(a)
    summary = run(BatchOptions(engine=a.engine, items=a.prompts, out=a.out, workers=a.workers, address=a.address,
                               seed=a.seed, steps=a.steps, guidance_scale=a.guidance_scale, loras=a.lora or [],
                               gpus_per_worker=a.gpus_per_worker, trusted_keys=[str(k) for k in keys]))
    print(f"{a.out}: {summary.line()}")
    if summary.failed:
        first = next(iter(summary.failed.items()))
        raise SvdExportError(f"{len(summary.failed)} items failed (item {first[0]}: {first[1]}); rerun to retry "
                             f"them, the finished ones are kept (see {a.out}/summary.json)")
