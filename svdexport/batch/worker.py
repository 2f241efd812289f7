"""The Ray actor of a batch job: loads the engine once, turns items into PNG bytes and metadata.

Workers return the image instead of writing it: the driver is the only writer, so an item is written
exactly once whichever worker made it, and workers need no shared filesystem for the outputs.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

from svdexport.models.lora import LoraFile


class Worker:
    def __init__(self, engine_dir: str, threads: int, steps: int | None, guidance_scale: float,
                 trusted_keys: list[str] | None = None, loras: list[tuple[str, float]] | None = None):
        import torch

        import svdexport

        torch.set_num_threads(max(1, threads))
        # Verifies the manifest and hashes on this node, and the signature when the job requires one.
        self.engine = svdexport.load(engine_dir, trusted_keys=trusted_keys or None)
        # Before the first item, and before the pipeline: its transformer stand-in keeps the engine's LoRAs.
        # A file that fits no module of the model fails here, so the driver's ready() wait reports it in one line.
        self.loras = [LoraFile(Path(path), scale) for path, scale in loras or []]
        if self.loras:
            self.engine.set_loras(self.loras)
        self.steps = steps or self.engine.steps
        self.guidance_scale = guidance_scale
        self.pipe = None
        if self.engine.conditioning.value == "pipeline":
            from svdexport.runtime.pipeline import pipeline_for

            self.pipe = pipeline_for(self.engine)

    def ready(self) -> dict:
        return {"pid": os.getpid(), "node": os.uname().nodename}

    def close(self) -> None:
        """Removes what loading the engine extracted (AOTInductor packages) before the actor is killed."""
        self.engine.close()

    def generate(self, index: int, text: str, seed: int) -> tuple[bytes, dict]:
        import torch

        engine, start = self.engine, time.perf_counter()
        if self.pipe is not None:
            shapes = engine.shapes
            image = self.pipe(prompt=text, height=shapes.height, width=shapes.width, num_inference_steps=self.steps,
                              guidance_scale=self.guidance_scale, max_sequence_length=shapes.text_len,
                              generator=torch.Generator().manual_seed(seed)).images[0]
            plan = self.pipe.transformer.plan_of_last_call()
            full, sampling = sum(plan), None
        else:
            labels = None
            if engine.labels:
                if text not in engine.labels:
                    raise ValueError(f"class {text!r} is not one of this engine's ({', '.join(engine.labels)})")
                labels = [engine.labels.index(text)] * engine.shapes.batch
            result = engine.generate(seed=seed, steps=self.steps, labels=labels)
            image, full, sampling = engine.preview(result.latents), result.full_steps, result.seconds
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        meta = {"steps": self.steps, "full_steps": full, "cached_steps": self.steps - full,
                **({"loras": [str(lora) for lora in self.loras]} if self.loras else {}),
                "sampling_seconds": sampling, "seconds": time.perf_counter() - start,
                "worker": f"{os.uname().nodename}:{os.getpid()}"}
        return buf.getvalue(), meta
