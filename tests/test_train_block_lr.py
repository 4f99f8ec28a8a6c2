"""--block-lr: a factor on the learning rate per UNet block (and BASE for the text encoders), in the
lora-block-weight syntax that block weights use at generation; kohya's down/mid/up_lr_weight. A block at 0 is not
trained and its layers are left out of the file; the factors are the optimizer's groups, so a run at half the rate
in every block is the run at half the learning rate, bit for bit. --block-ranks/--block-alphas (kohya's block_dims
and block_alphas) shape each block's layers the same way."""

import json

import pytest
import torch
from small_runs import factors, outline_dataset, resumes_exactly, settings

from sdtune.lora import blocks
from sdtune.lora.formats import load_lora
from sdtune.safeio import SdtuneError, read_metadata
from sdtune.train.lora import Network, plan_layers, train_lora


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return outline_dataset(tmp_path_factory.mktemp("data"))


def _blocks(base, keys) -> set:
    unet = blocks.unet_blocks(base.unet.config)
    return {blocks.block_of(comp, path, unet) for comp, path in keys}


def test_half_the_rate_in_every_block_is_the_run_at_half_the_learning_rate(base, dataset, tmp_path):
    half = factors(train_lora(base, settings(dataset, tmp_path / "blocks", lr=2e-3, block_lr="ALL0.5",
                                             text_encoder=True)))
    plain = factors(train_lora(base, settings(dataset, tmp_path / "plain", lr=1e-3, text_encoder=True)))
    assert half.keys() == plain.keys() and all(torch.equal(x, y) for k in half for x, y in zip(half[k], plain[k]))


def test_blocks_at_zero_are_left_out_and_the_others_train_at_their_factor(base, dataset, tmp_path):
    # the tiny model's 8 weights: BASE, IN01, IN03, M00, OUT02, OUT03, OUT04, OUT05
    spec = "1,0,0,2,0.5,0.5,1,1"
    s = settings(dataset, tmp_path / "o", block_lr=spec, text_encoder=True, te_lr=1e-4)
    modules, _ = plan_layers(base, s)
    everything, _ = plan_layers(base, settings(dataset, tmp_path / "o", text_encoder=True))
    kept = {(c, p) for c, p, _ in modules}
    assert _blocks(base, kept) == {"BASE", "M00", "OUT02", "OUT03", "OUT04", "OUT05"}
    assert _blocks(base, {(c, p) for c, p, _ in everything} - kept) == {"IN01", "IN03"}
    groups = {g["name"]: (g["lr"], len(g["params"])) for g in Network(base, s, (modules, {})).param_groups(
        {"unet": 2e-3, "text_encoder": 1e-4})}
    assert {name: lr for name, (lr, _) in groups.items()} == {
        "unet x2": 4e-3, "unet x0.5": 1e-3, "unet": 2e-3, "text_encoder": 1e-4}
    # each group holds the two factors of its blocks' layers
    per_block = {b: sum(_blocks(base, {(c, p)}) == {b} for c, p, _ in modules) for b in ("M00", "OUT02", "OUT03")}
    assert groups["unet x2"][1] == 2 * per_block["M00"]
    assert groups["unet x0.5"][1] == 2 * (per_block["OUT02"] + per_block["OUT03"])

    path = resumes_exactly(base, dataset, tmp_path, block_lr=spec)
    assert not any(".down_blocks." in k or "_down_blocks_" in k for k in factors(path))
    args = json.loads(read_metadata(path)["ss_network_args"])
    assert args == {"down_lr_weight": "0,0,0,0,0,0", "mid_lr_weight": "2", "up_lr_weight": "0,0,0.5,0.5,1,1"}


def test_bad_block_lrs_are_one_line(base, dataset, tmp_path):
    def plan(spec, **kw):
        return plan_layers(base, settings(dataset, tmp_path / "o", block_lr=spec, **kw))

    with pytest.raises(SdtuneError, match=r"^--block-lr 1,2,3: the built-in tiny model takes 8 or 14 "
                                          r"comma-separated block weights, or a preset: NONE, ALL"):
        plan("1,2,3")
    with pytest.raises(SdtuneError, match=r"^--block-lr 1,1,1,-1,1,1,1,1: M00 is -1; give 0 \(not trained\) or "
                                          r"more$"):
        plan("1,1,1,-1,1,1,1,1")
    with pytest.raises(SdtuneError, match=r"^--block-lr NONE: gives every unet layer the run trains 0; give a block "
                                          r"that has layers a value$"):
        plan("NONE")
    with pytest.raises(SdtuneError, match=r"^--block-lr 0,1,1,1,1,1,1,1: gives every text_encoder layer the run "
                                          r"trains 0; give BASE a value, or leave out --text-encoder$"):
        plan("0,1,1,1,1,1,1,1", text_encoder=True)


def test_block_ranks_and_alphas_shape_each_blocks_layers_and_are_recorded_as_kohyas(base, dataset, tmp_path):
    # the tiny model's 8 weights: BASE, IN01, IN03, M00, OUT02, OUT03, OUT04, OUT05
    path = train_lora(base, settings(dataset, tmp_path / "o", block_ranks="4,0,2,8,4,4,2,2",
                                     block_alphas="1,1,1,4,2,2,2,2"))
    lora = load_lora(path)
    unet = blocks.unet_blocks(base.unet.config)
    got = {}
    for comp, path_, ad in lora.items():
        got.setdefault(blocks.block_of(comp, path_, unet), set()).add((ad.rank, ad.alpha))
    assert got == {"IN03": {(2, 1.0)}, "M00": {(8, 4.0)}, "OUT02": {(4, 2.0)}, "OUT03": {(4, 2.0)},
                   "OUT04": {(2, 2.0)}, "OUT05": {(2, 2.0)}}  # IN01 at rank 0: left out
    meta = read_metadata(path)
    assert json.loads(meta["ss_network_args"]) == {"block_dims": "0,0,0,2,0,0,8,0,0,4,4,2,2",
                                                   "block_alphas": "0,1,0,1,0,0,4,0,0,2,2,2,2"}
    assert meta["ss_network_dim"] == "Dynamic"
    with pytest.raises(SdtuneError, match=r"^--block-ranks 4,2.5,2,8,4,4,2,2: 2.5 is not a whole rank"):
        plan_layers(base, settings(dataset, tmp_path / "x", block_ranks="4,2.5,2,8,4,4,2,2"))
