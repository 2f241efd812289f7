import pytest
import torch
from diffusers import FluxTransformer2DModel

from svdexport.models import flux

TINY = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
# 128x128 px -> 8x8 = 64 image tokens, 8 text tokens: small enough for many whole generations.
TINY_SHAPES = flux.FluxShapes(batch=1, height=128, width=128, text_len=8)


def tiny_model(guidance: bool = False, seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**TINY, guidance_embeds=guidance).eval().requires_grad_(False)


@pytest.fixture(params=[False, True], ids=["no-guidance", "guidance"])
def model(request):
    return tiny_model(request.param)


@pytest.fixture
def shapes():
    return TINY_SHAPES
