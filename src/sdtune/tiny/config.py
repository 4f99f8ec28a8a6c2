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


def vae_widened(factor: int) -> dict:
    """``VAE`` at ``factor`` x its widths, with as many channels per group norm group."""
    return dict(VAE, block_out_channels=tuple(c * factor for c in VAE["block_out_channels"]),
                norm_num_groups=VAE["norm_num_groups"] * factor)


# ``vae_recipe --widen`` makes a VAE twice as wide (AutoencoderKL ties the encoder's widths to the decoder's)
# computing what it did, so the latents stay; the shipped VAE has these widths (the README lists its runs).
WIDE_VAE = vae_widened(2)

# The shipped VAE's latent scaling (its file's "scaling_factor"; test_tiny_single_file holds them equal). The
# families' configs carry it, with ``WIDE_VAE``, for a single file that lost sdtune's metadata (a ComfyUI or
# A1111 re-save): at 1.0 such a file would load and draw wrong images.
SHIPPED_VAE_SCALING = 0.49652421474456787

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


# ---------------------------------------------------------------- tiny-xl: the SDXL architecture at small widths
# It shares the VAE with ``tiny``; its first text encoder starts as tiny's, one (identity) layer deeper; it adds
# a second, projecting text encoder and an SDXL-layout UNet. The UNet keeps SDXL's module names: three levels, no attention at the first
# (the costly 16x16 self-attention goes, which pays for SDXL's two resnets per level), linear proj_in/out,
# and the added conditioning (pooled text + six size/crop time ids). One transformer block per level where
# SDXL has 1, 2 and 10, and 96 channels at the last level, keep its weights with the shared ones under 20 MB.

# SDXL reads its encoders' penultimate layer. Read so, tiny's 3-layer encoder gave features one layer short of
# what tiny's UNet learnt on, and tiny-xl drew colour-on-white scenes with the colours mixed (held-in 88%). Its
# first encoder starts as tiny's with a fourth layer that adds nothing (zero output projections, never read, so
# they stay zero): the penultimate layer is then tiny's last, and so is the last.
XL_TEXT_ENCODER_1 = dict(TEXT_ENCODER, num_hidden_layers=TEXT_ENCODER["num_hidden_layers"] + 1)

XL_TEXT_WIDTH_2 = 32

XL_TEXT_ENCODER_2 = dict(  # pooled output at the first end-of-text token; padding is "!" (id 0) as in SDXL
    TEXT_ENCODER, hidden_size=XL_TEXT_WIDTH_2, intermediate_size=128, num_attention_heads=2, hidden_act="gelu",
    pad_token_id=0, projection_dim=XL_TEXT_WIDTH_2)

XL_TIME_EMBED = 16  # per time id (SDXL: 256)

XL_UNET = dict(
    UNET,  # sample size, channels in and out, group norm as tiny's
    block_out_channels=(32, 64, 96),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    transformer_layers_per_block=(1, 1, 1),
    attention_head_dim=(1, 2, 3),  # heads per level (diffusers' reading): head size 32
    cross_attention_dim=TEXT_WIDTH + XL_TEXT_WIDTH_2,  # both encoders' penultimate layers, concatenated
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=XL_TIME_EMBED,
    projection_class_embeddings_input_dim=XL_TEXT_WIDTH_2 + 6 * XL_TIME_EMBED,
)


def configs(arch: str = "sd1") -> dict[str, dict]:
    """Every component's config of the tiny model ("sd1") or of tiny-xl ("sdxl") as shipped, as fresh dicts
    (``model.build`` makes the recipe's narrower random-init VAE)."""
    out = {"unet": dict(UNET), "vae": dict(WIDE_VAE, scaling_factor=SHIPPED_VAE_SCALING),
           "text_encoder": dict(TEXT_ENCODER), "scheduler": dict(SCHEDULER)}
    if arch == "sdxl":
        out |= {"unet": dict(XL_UNET), "text_encoder": dict(XL_TEXT_ENCODER_1),
                "text_encoder_2": dict(XL_TEXT_ENCODER_2)}
    return out
