"""The driver of a batch job: Ray actors, a work queue, retries, atomic outputs, one progress bar.

Scheduling is a queue, not fixed shards: each actor holds at most `IN_FLIGHT` items, and a finished one
frees a slot, so a slow or lost worker never strands a shard. An actor that dies (killed, out of memory,
node lost) fails its in-flight items with ActorDiedError: they go back to the front of the queue (counted
as retried) and a replacement actor starts. An item whose generation raises is retried up to
`max_retries` times, then reported as failed with its error; nothing is dropped silently.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from svdexport.batch import items as store
from svdexport.batch.worker import Worker
from svdexport.errors import SvdExportError, clip
from svdexport.models import family
from svdexport.runtime import manifest as manifest_io
from svdexport.runtime.loras import check_lora_options
from svdexport.media import writing
from svdexport.outputs import engine_folder_of, writable_parent

IN_FLIGHT = 2  # items queued per actor: one running, one ready to start
NAMESPACE = "svdexport-batch"  # Ray namespace of the workers ("svdexport-worker-K")


@dataclass
class BatchOptions:
    engine: str  # engine folder (the same path on every node)
    items: str  # prompt or class list, one per line
    out: str  # output folder (the driver's filesystem)
    workers: int = 1  # Ray actors
    address: str | None = None  # Ray cluster to join ("auto", "ray://host:10001"); None starts a local one
    seed: int = 0  # item i uses seed + i
    steps: int | None = None  # sampling steps; None = the engine's
    guidance_scale: float = 3.5  # for engines with text encoders (FLUX.1-dev)
    gpus_per_worker: float = 0  # e.g. 1 on a GPU cluster
    max_retries: int = 2  # extra attempts of an item whose generation raised
    trusted_keys: list[str] = field(default_factory=list)  # public keys; non-empty: engines must be signed
    loras: list[str] = field(default_factory=list)  # FILE[:SCALE], fused into every worker's engine before its first item


@dataclass
class Summary:
    total: int  # items in the list
    done: int = 0  # finished in this run
    skipped: int = 0  # finished in an earlier run
    retried: int = 0  # attempts repeated (lost worker or error)
    failed: dict = field(default_factory=dict)  # item index -> last error
    workers_lost: int = 0  # actors that died and were replaced
    seconds: float = 0.0  # generation wall time, from all workers ready to the last item
    startup_seconds: float = 0.0  # Ray start and engine loading in the workers
    workers: int = 0  # actors started

    @property
    def images_per_minute(self) -> float:
        return 60 * self.done / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        return (f"{self.done} done, {self.skipped} skipped (done before), {self.retried} retried, "
                f"{len(self.failed)} failed of {self.total}; {self.images_per_minute:.1f} images/min "
                f"with {self.workers} workers")


def _validate(opts: BatchOptions) -> tuple[dict, list[store.Item], list]:
    if opts.workers < 1:
        raise SvdExportError(f"--workers must be >= 1, got {opts.workers}")
    if opts.steps is not None and opts.steps < 1:
        raise SvdExportError(f"--steps must be >= 1, got {opts.steps}")
    manifest = manifest_io.read(Path(opts.engine), trusted_keys=opts.trusted_keys or None)  # workers verify again
    # Each file readable and a LoRA, each SCALE a number, a backend that takes new weights: before any work.
    loras = check_lora_options(opts.loras, manifest.backend, family(manifest.model.family),
                               options=manifest.backend_options)
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise SvdExportError(f"--out {out} is a file, not a folder")
    writable_parent(out / "job.json", "--out")  # tried in the folder the outputs go to (made and removed if new)
    if (engine := engine_folder_of(out)) is not None:
        raise SvdExportError(f"--out {out} is inside the engine folder {engine}; write outputs elsewhere")
    items = store.read_items(Path(opts.items), opts.seed)
    labels = manifest.model.conditioning.labels
    if labels:
        unknown = [i.text for i in items if i.text not in labels]
        if unknown:  # the line and the class names cut short: a line may be megabytes
            raise SvdExportError(f"{opts.items}: {clip(unknown[0])!r} is not a class of this engine "
                                 f"({clip(', '.join(labels), 200)})")
    return manifest, items, loras


def start_ray(opts: BatchOptions) -> bool:
    """Joins the cluster at --address, or starts a local runtime; True when this call started it."""
    try:
        import ray
    except ImportError:
        raise SvdExportError("svdexport batch needs Ray: pip install 'svdexport[ray]'") from None
    if ray.is_initialized():
        return False
    kwargs = dict(namespace=NAMESPACE, logging_level=logging.ERROR, log_to_driver=False)
    if opts.address is None:
        kwargs.update(include_dashboard=False, num_cpus=len(os.sched_getaffinity(0)))
    try:
        ray.init(address=opts.address, **kwargs)
    except Exception as e:  # ConnectionError and friends for a bad address
        raise SvdExportError(f"cannot start or join Ray at {opts.address or 'a local runtime'}: "
                             f"{str(e).splitlines()[0]}") from None
    return True


@contextmanager
def ray_stopped_on_exit(started: bool):
    """While a job runs on the local Ray runtime this driver started: SIGTERM and SIGHUP end the driver
    through Python (so the `finally` that stops Ray runs), and a watchdog process stops Ray's processes
    if the driver is killed outright (SIGKILL, out of memory), which no handler can see."""
    if not started:
        yield
        return
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)
           if threading.current_thread() is threading.main_thread()}
    watchdog = watch_ray()
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if watchdog is not None:
            watchdog.stdin.close()  # tells it the driver ended normally
            watchdog.wait(timeout=10)


def watch_ray():
    """Starts `batch/watchdog.py` over the local Ray runtime's processes (its own session)."""
    import subprocess
    import sys

    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # the local node this driver started
    if node is None:
        return None
    pids = [str(info.process.pid) for infos in node.all_processes.values() for info in infos if info.process]
    return subprocess.Popen([sys.executable, "-m", "svdexport.batch.watchdog", str(os.getpid()), *pids],
                            stdin=subprocess.PIPE, start_new_session=True)


def run(opts: BatchOptions, progress: bool = True) -> Summary:
    manifest, items, loras = _validate(opts)
    out = Path(opts.out)
    store.open_job(out, manifest.build_key, Path(opts.items), opts.seed, loras)
    todo = deque(i for i in items if not store.done(out, i))
    summary = Summary(total=len(items), skipped=len(items) - len(todo))
    if todo:
        started = start_ray(opts)
        try:
            with ray_stopped_on_exit(started):
                _drive(opts, todo, out, summary, progress, loras)
        finally:
            if started:
                import ray

                ray.shutdown()
    store.collect(out, items)
    with writing(out / "summary.json") as tmp:
        tmp.write_text(json.dumps({**asdict(summary), "images_per_minute": summary.images_per_minute}, indent=2))
    return summary


def _drive(opts: BatchOptions, todo: deque, out: Path, summary: Summary, progress: bool, loras: list) -> None:
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    t0 = time.perf_counter()
    cpus = max(1, int(ray.available_resources().get("CPU", 1)) // opts.workers) if opts.address is None else 1
    remote = ray.remote(Worker)
    names = iter(f"svdexport-worker-{k}" for k in range(10**6))
    lora_args = [(str(lora.path.resolve()), lora.scale) for lora in loras]  # workers may run in another folder

    def start_actor():
        return remote.options(name=next(names), num_cpus=cpus, num_gpus=opts.gpus_per_worker,
                              max_restarts=0).remote(str(Path(opts.engine).resolve()), cpus, opts.steps,
                                                     opts.guidance_scale, opts.trusted_keys, lora_args)

    actors = [start_actor() for _ in range(opts.workers)]
    summary.workers = len(actors)
    try:
        ray.get([a.ready.remote() for a in actors])
    except RayActorError as e:
        raise SvdExportError(f"the workers cannot load {opts.engine}: {_reason(e)}") from None
    summary.startup_seconds = time.perf_counter() - t0
    replacements = 2 * opts.workers  # actors may die; a job whose workers keep dying stops here
    attempts: Counter = Counter()
    pending: dict = {}  # ObjectRef -> (item, actor)
    load = Counter()  # actor -> items in flight

    def submit():
        for actor in actors:
            while todo and load[actor] < IN_FLIGHT:
                item = todo.popleft()
                pending[actor.generate.remote(item.index, item.text, item.seed)] = (item, actor)
                load[actor] += 1

    start = time.perf_counter()
    bar = tqdm(total=summary.total, initial=summary.skipped, desc="batch", unit="img", disable=not progress)
    submit()
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        item, actor = pending.pop(ref)
        load[actor] -= 1
        try:
            png, meta = ray.get(ref)
        except RayActorError:  # the worker is gone: its items go back, a replacement takes its place
            todo.appendleft(item)
            summary.retried += 1
            if actor in actors:
                actors.remove(actor)
                summary.workers_lost += 1
                if replacements > 0:
                    replacements -= 1
                    actors.append(start_actor())
                    summary.workers += 1
            if not actors:
                for lost in todo:
                    summary.failed[lost.index] = "no worker left (every replacement died too)"
                todo.clear()
        except RayTaskError as e:
            attempts[item.index] += 1
            if attempts[item.index] > opts.max_retries:
                summary.failed[item.index] = _reason(e)
            else:
                summary.retried += 1
                todo.append(item)
        else:
            store.write(out, item, png, meta)
            summary.done += 1
            bar.update()
            minutes = (time.perf_counter() - start) / 60
            bar.set_postfix_str(f"{summary.done / minutes:.1f} img/min, {len(actors)} workers")
        submit()
    bar.close()
    summary.seconds = time.perf_counter() - start
    try:  # each worker removes what its engine extracted (ray.kill gives it no chance)
        ray.get([a.close.remote() for a in actors], timeout=30)
    except Exception:
        pass  # a worker that died already left its files to the next load's clean-up (files.Scratch)
    for actor in actors:
        ray.kill(actor)


def _reason(e: Exception) -> str:
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    # Ray's last line names the exception's class; an SvdExportError's message is the whole story.
    # Cut short: the error may quote the item's prompt, which may be megabytes.
    return clip(text[-1].removeprefix("svdexport.errors.SvdExportError: "), 300) if text else type(cause).__name__
