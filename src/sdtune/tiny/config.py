"""Architecture of the built-in tiny model: the real SD 1.x classes, scaled down for a 64x64 world.

Module names and layer kinds match SD 1.5 (attn1/attn2 to_q/to_k/to_v/to_out.0, ff.net, proj_in/out,
resnet convs, text encoder q/k/v/out_proj, fc1/fc2), so every LoRA and TI code path runs as on SD 1.5.
"""

RESOLUTION = 64
TEXT_WIDTH = 64

UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=TEXT_WIDTH,
    attention_head_dim=(1, 2, 4),  # diffusers reads this as heads per level: head size 32 everywhere
    norm_num_groups=16,
    use_linear_projection=False,  # SD 1.x: proj_in/proj_out are 1x1 convs
)

VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32, 64),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=RESOLUTION,
)

TEXT_ENCODER = dict(
    vocab_size=49408,
    hidden_size=TEXT_WIDTH,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
    projection_dim=TEXT_WIDTH,
)

SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)
