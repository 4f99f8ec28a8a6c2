"""A small random model of the SD 1.x architecture, for tests: SD 1.x's block structure and module names.

The UNet keeps SD 1.x's four levels (attention at the first three), two layers per level and its cross-attention
width (768), so every SD 1.x LoRA key and block weight has its module here; only the channel widths are small
(a full-size random SD 1.x takes most of a minute to make on two cores). The text encoder keeps CLIP ViT-L's width,
with two layers instead of 12.
"""

from .xl_config import TEXT_ENCODER, VAE

UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 32, 64, 64),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "layers_per_block": 2,
    "attention_head_dim": 8,  # heads, as SD 1.x's config says it
    "norm_num_groups": 32,
    "cross_attention_dim": 768,
}
VAE = dict(VAE, scaling_factor=0.18215)  # SD 1.x's latent scale
TEXT_ENCODER = dict(TEXT_ENCODER)
