"""FLUX's text encoders as a family ability: prompts through FluxPipeline.encode_prompt for calibration, and
the graph inputs from the keyword arguments FluxPipeline passes its transformer (for `svdexport.apply`)."""

from __future__ import annotations

import torch
from tqdm import tqdm

from svdexport.errors import SvdExportError
from svdexport.models.family import PromptEncoder, Shapes
from svdexport.models.weights import WeightsInfo, from_pretrained

TEXT_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


class FluxPrompts(PromptEncoder):
    pipeline_class = "FluxPipeline"
    default_guidance = 3.5  # FLUX.1-dev's distilled guidance

    def __init__(self, rotary):
        self.rotary = rotary  # (config, txt_ids, img_ids) -> (cos, sin), the family's rotary table

    def available(self, info: WeightsInfo) -> bool:
        return all(p in info.pipeline_parts for p in TEXT_PARTS)

    @torch.inference_mode()
    def encode(self, info: WeightsInfo, prompts: list[str], text_len: int, dtype: torch.dtype,
               device: str) -> dict[str, torch.Tensor]:
        """Per prompt, encoder_hidden_states and pooled_projections from the folder's own text encoders
        (FluxPipeline.encode_prompt); the encoders are freed when it returns."""
        from diffusers import FluxPipeline

        try:
            pipe = from_pretrained(FluxPipeline, info.source, dtype, transformer=None, vae=None).to(device)
        except Exception as e:
            raise SvdExportError(f"cannot load the text encoders of {info.source}: {str(e).splitlines()[0]}") from None
        rows = [pipe.encode_prompt(prompt=p, prompt_2=None, device=device, max_sequence_length=text_len)[:2]
                for p in tqdm(prompts, desc="encoding prompts", unit="prompt", leave=False)]
        return {"encoder_hidden_states": torch.cat([e for e, _ in rows]).cpu(),
                "pooled_projections": torch.cat([p for _, p in rows]).cpu()}

    def call_inputs(self, config: dict, kwargs: dict, memo: dict) -> dict[str, torch.Tensor]:
        """`memo` keeps the rotary table between calls: the position ids are the same at every step."""
        img_ids, txt_ids = (kwargs[k][0] if kwargs[k].ndim == 3 else kwargs[k] for k in ("img_ids", "txt_ids"))
        old = memo.get("ids")
        if old is None or not (torch.equal(old[0], txt_ids) and torch.equal(old[1], img_ids)):
            memo["ids"], memo["rotary"] = (txt_ids.clone(), img_ids.clone()), self.rotary(config, txt_ids, img_ids)
        inputs = {k: kwargs[k] for k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")}
        inputs.update(img_ids=img_ids, txt_ids=txt_ids, rotary_cos=memo["rotary"][0], rotary_sin=memo["rotary"][1])
        if config.get("guidance_embeds"):
            if kwargs.get("guidance") is None:
                raise SvdExportError("this engine's model is guidance-distilled (FLUX.1-dev) and needs a guidance scale")
            inputs["guidance"] = kwargs["guidance"].float()
        return inputs

    def generate(self, pipe, prompts: list[str], shapes: Shapes, steps: int, guidance_scale: float,
                 generator: torch.Generator) -> list:
        """The decoded images (PIL), one per prompt."""
        return pipe(prompt=prompts, height=shapes.height, width=shapes.width, num_inference_steps=steps,
                    guidance_scale=guidance_scale, max_sequence_length=shapes.text_len, generator=generator).images
