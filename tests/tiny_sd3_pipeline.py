"""A tiny Stable Diffusion 3 pipeline from real diffusers and transformers classes, built offline.

- transformer: SD3Transformer2DModel, 3 joint blocks (SD3.5 Medium's MMDiT-X: `attn2` in the first; RMS qk-norm;
  the last block context_pre_only), hidden 32 (2 heads x 16), 16 latent channels, a position table of 16x16
  patches (256 pixels a side at most);
- vae: the 4-level AutoencoderKL of tiny_pipeline.py (8 pixels per latent, 16 latent channels);
- text_encoder / text_encoder_2: 2-layer CLIPTextModelWithProjection (CLIP-L and CLIP-G stand-ins, hidden 8 and
  projections 8 each: pooled 16) with character-level CLIPTokenizers of 8 positions;
- text_encoder_3 / tokenizer_3: a 2-layer T5EncoderModel (d_model 32, the joint attention width) and
  tiny_pipeline.py's character-level T5 tokenizer;
- scheduler: FlowMatchEulerDiscreteScheduler with SD3's shift 3.

The text the transformer sees: CLIP's 8 tokens, then T5's `max_sequence_length` (8 in CALL): 16 tokens.
"""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

from tiny_pipeline import CHARS, tiny_vae

TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16,
                   out_channels=16, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
CLIP_TOKENS = 8
SHAPES = dict(height=128, width=128, text_len=CLIP_TOKENS + 8)
CALL = dict(height=128, width=128, max_sequence_length=8)
PROMPTS = ["a red fox in fresh snow", "a lighthouse in a storm", "waves on a beach at dawn"]


def clip(seed: int, width: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_TOKENS)
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=width, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=CLIP_TOKENS, projection_dim=width, bos_token_id=0, eos_token_id=1,
        pad_token_id=1)).eval()
    return model, tokenizer


def t5():
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in CHARS] + [("\u2581", -1.0)]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0)
    torch.manual_seed(3)
    model = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=TRANSFORMER["joint_attention_dim"], d_kv=8,
                                    d_ff=32, num_layers=2, num_heads=2, relative_attention_num_buckets=8)).eval()
    return model, tokenizer


def transformer(seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**TRANSFORMER).eval().requires_grad_(False)


def tiny_sd3_pipeline() -> StableDiffusion3Pipeline:
    (clip_l, tok_l), (clip_g, tok_g), (t5_model, tok_t5) = clip(1, 8), clip(2, 8), t5()
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=1.5305, shift_factor=0.0609)  # SD3's VAE constants
    return StableDiffusion3Pipeline(transformer=transformer(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=clip_l, tokenizer=tok_l, text_encoder_2=clip_g,
                                    tokenizer_2=tok_g, text_encoder_3=t5_model, tokenizer_3=tok_t5)
