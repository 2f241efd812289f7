"""A tiny FLUX pipeline from real diffusers and transformers classes, built offline.

The transformer is the tests' TINY FluxTransformer2DModel; the VAE a 4-level AutoencoderKL (8 pixels per
latent, as FLUX's) with 16 latent channels; the text encoders a 2-layer CLIPTextModel and T5EncoderModel
with character-level tokenizers made from an in-memory vocabulary.
"""

import string

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

from helpers import tiny_model
from svdexport.models import flux

CHARS = string.ascii_lowercase + string.digits


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                         layers_per_block=1, latent_channels=16, norm_num_groups=4, sample_size=128,
                         scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                         use_post_quant_conv=False).eval()


def tiny_text_encoders(joint_dim: int, pooled_dim: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    torch.manual_seed(1)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=pooled_dim, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                        projection_dim=pooled_dim, bos_token_id=0, eos_token_id=1,
                                        pad_token_id=1)).eval()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in CHARS] + [("\u2581", -1.0)]
    tokenizer_2 = T5TokenizerFast(vocab=pieces, extra_ids=0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=joint_dim, d_kv=8, d_ff=32, num_layers=2,
                                 num_heads=2, relative_attention_num_buckets=8)).eval()
    return dict(text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer_2)


def tiny_pipeline(guidance: bool = True, text_encoders: bool = False) -> FluxPipeline:
    model = tiny_model(guidance)
    encoders = (tiny_text_encoders(model.config.joint_attention_dim, model.config.pooled_projection_dim)
                if text_encoders else dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(flux.SAMPLER_CONFIG), vae=tiny_vae(),
                        transformer=model, **encoders)


def prompt_embeds(batch: int = 1, seed: int = 0) -> dict:
    """Prompt embeddings of the tiny transformer's widths (8 text tokens), in place of text encoders."""
    g = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(batch, 8, 32, generator=g),
            "pooled_prompt_embeds": torch.randn(batch, 16, generator=g)}
