"""SD3's text encoders as a family ability: prompts through StableDiffusion3Pipeline.encode_prompt (CLIP-L and
CLIP-G, whose hidden states are joined and padded to T5's width, then T5's) for calibration, the graph inputs
from the keyword arguments the pipeline passes its transformer (for `svdexport.apply`), and the whole pipeline
for `run --prompt`.

The text is CLIP's tokens (the tokenizer's 77) then T5's, so an engine's `text_len` is 77 plus the pipeline's
`max_sequence_length`. The pipeline's classifier-free guidance is one transformer call on the negative and
the positive rows together (`batched_cfg`).
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from svdexport.errors import SvdExportError
from svdexport.models.family import PromptEncoder, Shapes
from svdexport.models.weights import WeightsInfo, from_pretrained

TEXT_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
INPUTS = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")


def t5_tokens(pipe, text_len: int) -> int:
    """The pipeline's max_sequence_length for `text_len` tokens in all: what CLIP's tokenizer leaves to T5."""
    clip = pipe.tokenizer_max_length
    if text_len <= clip:
        raise SvdExportError(f"text_len {text_len} leaves no T5 tokens: SD3's text is CLIP's {clip} tokens, then T5's "
                             f"(e.g. --text-len {clip + 256} for max_sequence_length 256)")
    return text_len - clip


class SD3Prompts(PromptEncoder):
    pipeline_class = "StableDiffusion3Pipeline"
    default_guidance = 7.0  # StableDiffusion3Pipeline's guidance_scale
    batched_cfg = True

    def available(self, info: WeightsInfo) -> bool:
        return all(p in info.pipeline_parts for p in TEXT_PARTS)

    @torch.inference_mode()
    def encode(self, info: WeightsInfo, prompts: list[str], text_len: int, dtype: torch.dtype,
               device: str) -> dict[str, torch.Tensor]:
        """Per prompt, encoder_hidden_states [text_len, D] and pooled_projections from the folder's own three
        encoders (no negative prompt: calibration runs the conditional pass); freed when it returns."""
        from diffusers import StableDiffusion3Pipeline

        try:
            pipe = from_pretrained(StableDiffusion3Pipeline, info.source, dtype, transformer=None, vae=None).to(device)
        except Exception as e:
            raise SvdExportError(f"cannot load the text encoders of {info.source}: {str(e).splitlines()[0]}") from None
        t5 = t5_tokens(pipe, text_len)
        rows = [pipe.encode_prompt(prompt=p, prompt_2=None, prompt_3=None, device=device,
                                   do_classifier_free_guidance=False, max_sequence_length=t5)
                for p in tqdm(prompts, desc="encoding prompts", unit="prompt", leave=False)]
        del pipe
        return {"encoder_hidden_states": torch.cat([r[0] for r in rows]).cpu(),
                "pooled_projections": torch.cat([r[2] for r in rows]).cpu()}

    def call_inputs(self, config: dict, kwargs: dict, memo: dict) -> dict[str, torch.Tensor]:
        """StableDiffusion3Pipeline's call: latents [B, C, H/8, W/8], the raw timestep, the joined text
        embeddings and the pooled ones (negative rows first under CFG)."""
        for name, why in (("skip_layers", "skip-layer guidance runs the model without some blocks: call the "
                           "pipeline without skip_guidance_layers"),
                          ("block_controlnet_hidden_states", "ControlNet residuals are not engine inputs")):
            if kwargs.get(name) is not None:
                raise SvdExportError(f"an engine takes no {name} ({why})")
        return {k: kwargs[k] for k in INPUTS}

    def generate(self, pipe, prompts: list[str], shapes: Shapes, steps: int, guidance_scale: float,
                 generator: torch.Generator) -> list:
        """The decoded images (PIL), one per prompt."""
        return pipe(prompt=prompts, height=shapes.height, width=shapes.width, num_inference_steps=steps,
                    guidance_scale=guidance_scale, max_sequence_length=t5_tokens(pipe, shapes.text_len),
                    generator=generator).images
