"""HunyuanVideo's text encoders as a family ability: prompts through HunyuanVideoPipeline.encode_prompt (the
Llama encoder's hidden states under the pipeline's prompt template, with their attention mask, and CLIP's
pooled output) for calibration, the graph inputs from the keyword arguments HunyuanVideoPipeline passes its
transformer (for `svdexport.apply`), and the whole pipeline for `run --prompt`."""

from __future__ import annotations

import torch
from tqdm import tqdm

from svdexport.errors import SvdExportError
from svdexport.models.family import PromptEncoder, Shapes
from svdexport.models.weights import WeightsInfo, from_pretrained

TEXT_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")  # Llama, CLIP and their tokenizers
INPUTS = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask", "pooled_projections")


class HunyuanVideoPrompts(PromptEncoder):
    pipeline_class = "HunyuanVideoPipeline"
    default_guidance = 6.0  # HunyuanVideoPipeline's embedded guidance scale

    def available(self, info: WeightsInfo) -> bool:
        return all(p in info.pipeline_parts for p in TEXT_PARTS)

    @torch.inference_mode()
    def encode(self, info: WeightsInfo, prompts: list[str], text_len: int, dtype: torch.dtype,
               device: str) -> dict[str, torch.Tensor]:
        """Per prompt, encoder_hidden_states [text_len, D], its encoder_attention_mask (1 for the prompt's
        tokens, 0 for padding) and pooled_projections, from the folder's own encoders with the pipeline's
        default prompt template; the encoders are freed when it returns."""
        from diffusers import HunyuanVideoPipeline

        try:
            pipe = from_pretrained(HunyuanVideoPipeline, info.source, dtype, transformer=None, vae=None).to(device)
        except Exception as e:
            raise SvdExportError(f"cannot load the text encoders of {info.source}: {str(e).splitlines()[0]}") from None
        rows = [pipe.encode_prompt(prompt=p, device=device, dtype=dtype, max_sequence_length=text_len)
                for p in tqdm(prompts, desc="encoding prompts", unit="prompt", leave=False)]
        del pipe
        return {"encoder_hidden_states": torch.cat([e for e, _, _ in rows]).cpu(),
                "pooled_projections": torch.cat([p for _, p, _ in rows]).cpu(),
                "encoder_attention_mask": torch.cat([m for _, _, m in rows]).long().cpu()}

    def call_inputs(self, config: dict, kwargs: dict, memo: dict) -> dict[str, torch.Tensor]:
        """HunyuanVideoPipeline's call: latents [B, C, F, H, W], the raw timestep (0..1000), the Llama
        embeddings with their mask (in the transformer's dtype; the engine casts it to its own), CLIP's
        pooled output and the guidance scale times 1000."""
        inputs = {k: kwargs[k] for k in INPUTS}
        if config.get("guidance_embeds"):
            if kwargs.get("guidance") is None:
                raise SvdExportError("this engine's model is guidance-distilled (HunyuanVideo) and needs a guidance "
                                     "scale")
            inputs["guidance"] = kwargs["guidance"]
        return inputs

    def generate(self, pipe, prompts: list[str], shapes: Shapes, steps: int, guidance_scale: float,
                 generator: torch.Generator) -> list:
        """Per prompt, the decoded video's frames (PIL), `shapes.frames` of them."""
        return pipe(prompt=prompts, num_frames=shapes.frames, height=shapes.height, width=shapes.width,
                    num_inference_steps=steps, guidance_scale=guidance_scale, max_sequence_length=shapes.text_len,
                    generator=generator, output_type="pil").frames
