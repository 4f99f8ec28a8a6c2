"""kohya's block-wise network_args (down/mid/up_lr_weight with presets and the zero threshold, block_dims and
block_alphas, conv_block_dims/alphas) read as --block-lr, --block-ranks, --block-alphas and --conv-rank/alpha in the
lora-block-weight layout: SD 1.x's 12/1/12 and 25, SDXL's 9/3/9 and 23; the layers each block keeps follow."""

import math

import pytest

from sdtune import families
from sdtune.lora import blocks
from sdtune.models import load_base
from sdtune.safeio import SdtuneError
from sdtune.train.config import load_settings
from sdtune.train.lora import plan_layers

ONES = ",".join(["1"] * 12)


def settings(tmp_path, args: list[str], family="sd1", extra=""):
    cfg = tmp_path / "config_lora.toml"
    cfg.write_text(f'pretrained_model_name_or_path = "m"\nnetwork_module = "networks.lora"\nnetwork_dim = 8\n'
                   f'network_alpha = 4\nnetwork_args = {args!r}\n{extra}'.replace("'", '"'))
    return load_settings(cfg, {"data": "d", "out": str(tmp_path / "o")}, "lora", family=family)


def test_sd1_lists_presets_and_the_zero_threshold(tmp_path):
    s = settings(tmp_path, ["down_lr_weight=0,0,0,0,0,0,0.5", "mid_lr_weight=2", f"up_lr_weight={ONES}"])
    # a short list is filled with 1 (sd-scripts' rule); BASE (the text encoders) keeps its rate
    assert s.block_lr == "1,0,0,0,0,0,0,0.5,1,1,1,1,1,2," + ONES
    s = settings(tmp_path, ["down_lr_weight=sine", "up_lr_weight=cosine+0.5", "block_lr_zero_threshold=0.2"])
    weights = [float(v) for v in s.block_lr.split(",")]
    sine = [math.sin(math.pi * i / 22) for i in range(12)]
    assert weights[1:13] == pytest.approx([w if w > 0.2 else 0 for w in sine], abs=1e-6)  # IN00, IN01 at or below
    assert weights[14:] == pytest.approx([w + 0.5 for w in reversed(sine)], abs=1e-6) and weights[13] == 1
    assert blocks.parse(s.block_lr, families.SD1)["IN02"] == pytest.approx(sine[2], abs=1e-6)


def test_block_dims_and_alphas_take_the_text_encoders_rank_and_alpha_as_base(tmp_path):
    dims = ",".join(str(d) for d in [0, 2, 2, 2, 4, 4, 4, 8, 8, 8, 8, 8, 16, 8, 8, 8, 8, 8, 4, 4, 4, 2, 2, 2, 2])
    s = settings(tmp_path, [f"block_dims={dims}", f"block_alphas={dims}", "conv_block_dims=" + ",".join(["4"] * 25),
                            "conv_block_alphas=" + ",".join(["2"] * 25)])
    assert (s.block_ranks, s.block_alphas, s.conv_rank, s.conv_alpha) == ("8," + dims, "4," + dims, 4, 2.0)


def test_sdxl_counts_nine_blocks_a_side_and_a_middle_block_of_three_parts(tmp_path):
    dims = [0, *range(1, 10), 5, 5, 5, *range(11, 20), 0]  # time embedding, IN00-08, the middle's parts, OUT00-08, out
    s = settings(tmp_path, [f"block_dims={','.join(map(str, dims))}", "down_lr_weight=linear", "mid_lr_weight=0,0,0"],
                 family="sdxl")
    assert s.block_ranks == "8,1,2,3,4,5,6,7,8,9,5,11,12,13,14,15,16,17,18,19"
    assert s.block_lr == ",".join(["1", *(f"{i / 8:g}" for i in range(9)), "0", *["1"] * 9])
    with pytest.raises(SdtuneError, match=r"mid_lr_weight: SDXL's middle block in parts of \[0.5, 1.0, 1.0\]; "
                                          r"sdtune weighs the middle block as one \(M00\)"):
        settings(tmp_path, ["mid_lr_weight=0.5"], family="sdxl")
    # before the model loads (its family unknown), SDXL's lists are known by their lengths or its sdxl switch
    assert settings(tmp_path, ["mid_lr_weight=0,0,0"], family=None).block_lr.count(",") == 19
    assert settings(tmp_path, ["down_lr_weight=zeros"], family=None, extra="sdxl = true\n").block_lr.count(",") == 19


@pytest.mark.parametrize("args, family, says", [
    (["block_dims=2,2,2"], "sd1", "network_args block_dims: 3 numbers; sd-scripts takes 25 for this model's blocks"),
    ([f"down_lr_weight={ONES},1"], "sd1", "down_lr_weight: 13 numbers, and this model has 12 such block(s)"),
    (["down_lr_weight=wave"], "sd1", "down_lr_weight=wave: not comma-separated numbers"),
    (["conv_block_dims=" + ",".join(["4"] * 24 + ["8"])], "sd1", "sdtune trains the 3x3 convolutions at one "
                                                                 "--conv-rank"),
    (["down_lr_weight=sine"], "tiny", "sd-scripts' block lists are SD 1.x/2.x's and SDXL's, and this model is"),
])
def test_what_sdtune_cannot_read_is_one_line(tmp_path, args, family, says):
    with pytest.raises(SdtuneError, match=r"config_lora.toml: network_args") as e:
        settings(tmp_path, args, family=family)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_blocks_at_zero_are_left_out_of_the_layers_a_run_trains(tmp_path):
    base = load_base("sd1-small-random", device="cpu", dtype="fp32")
    s = settings(tmp_path, [f"down_lr_weight={','.join(['0'] * 12)}", "mid_lr_weight=0"])
    unet = blocks.unet_blocks(base.unet.config)
    trained = {blocks.block_of(comp, path, unet) for comp, path, _ in plan_layers(base, s)[0]}
    assert trained and all(b is None or b.startswith("OUT") or b == blocks.BASE for b in trained)
