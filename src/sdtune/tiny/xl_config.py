"""A small random model of the SDXL architecture, for tests: SDXL's block structure and module names.

The UNet keeps SDXL's three levels (no attention at the first), its transformer depths (1, 2, 10) and its
added conditioning (pooled text + size/crop time ids), so every SDXL LoRA key has its module here; only the
channel widths are small. The text encoders keep SDXL's widths (768 and 1280), so SDXL embeddings
(``clip_l``/``clip_g``) and text-encoder LoRAs fit, with two layers each instead of 12 and 32.
"""

UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64, 128),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (1, 2, 4),  # heads per level (diffusers' reading): head size 32
    "norm_num_groups": 32,
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 1280 + 6 * 256,  # pooled text + six time ids
}

VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (32, 32, 64, 64),  # four levels: 8x downsampling, as SD's VAE
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 64,
    "scaling_factor": 0.13025,
}

_CLIP = {"vocab_size": 49408, "max_position_embeddings": 77, "num_hidden_layers": 2, "intermediate_size": 256}
TEXT_ENCODER = {**_CLIP, "hidden_size": 768, "num_attention_heads": 12, "hidden_act": "quick_gelu",
                "projection_dim": 768, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
TEXT_ENCODER_2 = {**_CLIP, "hidden_size": 1280, "num_attention_heads": 20, "hidden_act": "gelu",
                  "projection_dim": 1280, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
