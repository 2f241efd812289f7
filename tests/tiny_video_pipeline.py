"""A tiny HunyuanVideo pipeline from real diffusers and transformers classes, built offline.

- transformer: HunyuanVideoTransformer3DModel, 1 double + 2 single blocks, hidden 32 (2 heads x 16), 4 latent
  channels, guidance embedder;
- vae: AutoencoderKLHunyuanVideo with 4 levels (8x8 pixels and 4 frames per latent, as the real one), 4 latent
  channels;
- text_encoder: a 3-layer LlamaModel (hidden 32). HunyuanVideoPipeline takes hidden_states[-3], the output
  of the first layer here (4 hidden states: the embeddings and 3 layers);
- tokenizer: a word-level tokenizer made in memory with Llama 3's pre-tokenizer split and special tokens, so
  the default prompt template's prefix is exactly the 95 tokens its `crop_start` removes and the cropped
  embeddings start at the prompt's first word. It is a PreTrainedTokenizerFast: transformers' own
  LlamaTokenizerFast rebuilds a BPE with a Metaspace split from the vocabulary when loaded from a folder,
  which does not round-trip a word-level model;
- text_encoder_2 / tokenizer_2: a 2-layer CLIPTextModel (hidden 16, the pooled projection) and a
  character-level CLIPTokenizer of 77 positions (the pipeline pads CLIP prompts to 77);
- scheduler: FlowMatchEulerDiscreteScheduler with HunyuanVideo's shift 7.
"""

import re
import string

import torch
from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                       HunyuanVideoTransformer3DModel)
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

from svdexport.models.weights import read_prompts

TRANSFORMER = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                   num_single_layers=2, num_refiner_layers=1, text_embed_dim=32, pooled_projection_dim=16,
                   rope_axes_dim=(4, 6, 6), guidance_embeds=True, patch_size=2, patch_size_t=1)
# 9 frames of 64x64 pixels -> 3 x 8 x 8 latents -> 3 x 4 x 4 = 48 image tokens; 8 text tokens.
SHAPES = dict(frames=9, height=64, width=64, text_len=8)
CALL = dict(num_frames=9, height=64, width=64, max_sequence_length=8, guidance_scale=6.0)
PROMPTS = ["a red fox runs in fresh snow", "a lighthouse in a storm", "waves on a beach at dawn"]

# Llama 3's pre-tokenizer split (tokenizer.json of Meta-Llama-3, as llava-llama-3 in HunyuanVideo uses).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>"]
CHARS = string.ascii_lowercase + string.digits


def llama_tokenizer(texts: list[str]):
    """Word-level: every pre-token of the template and `texts` is one token, anything else <unk>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated")
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for text in [DEFAULT_PROMPT_TEMPLATE["template"], *texts]:
        for part in re.split("|".join(map(re.escape, SPECIALS + ["{}"])), text):
            for word, _ in split.pre_tokenize_str(part):
                vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = split
    backend.add_special_tokens(SPECIALS)
    backend.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", 1)])
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", unk_token="<unk>",
                                   eos_token="<|end_of_text|>", pad_token="<|end_of_text|>", padding_side="right")


def text_encoders():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, LlamaConfig, LlamaModel

    tokenizer = llama_tokenizer(read_prompts(None) + PROMPTS)
    torch.manual_seed(2)
    llama = LlamaModel(LlamaConfig(vocab_size=len(tokenizer), hidden_size=TRANSFORMER["text_embed_dim"],
                                   intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=512, pad_token_id=2)).eval()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tokenizer_2 = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    width = TRANSFORMER["pooled_projection_dim"]
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                        projection_dim=width, bos_token_id=0, eos_token_id=1,
                                        pad_token_id=1)).eval()
    return dict(text_encoder=llama, tokenizer=tokenizer, text_encoder_2=clip, tokenizer_2=tokenizer_2)


def vae() -> AutoencoderKLHunyuanVideo:
    torch.manual_seed(3)
    return AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=TRANSFORMER["in_channels"],
                                     block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                                     spatial_compression_ratio=8, temporal_compression_ratio=4).eval()


def transformer(seed: int = 0) -> HunyuanVideoTransformer3DModel:
    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(**TRANSFORMER).eval().requires_grad_(False)


def tiny_video_pipeline() -> HunyuanVideoPipeline:
    return HunyuanVideoPipeline(transformer=transformer(), vae=vae(), **text_encoders(),
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
