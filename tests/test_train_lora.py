"""LoRA training: targets, the saved kohya and diffusers files (loaded back by sdtune and diffusers), metadata."""

import copy
import dataclasses
import json
import re

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors import safe_open
from small_runs import factors, resumes_exactly

import sdtune
from sdtune import families
from sdtune.cli import main
from sdtune.console import SdtuneWarning
from sdtune.lora import algos
from sdtune.lora.algos.oft import butterfly_split
from sdtune.lora.formats import load_lora
from sdtune.lora.neutral import Adapter
from sdtune.lora.patch import LoraSet
from sdtune.safeio import SdtuneError, read_metadata
from sdtune.tiny import world
from sdtune.train import lora as lora_train
from sdtune.train.config import LoraSettings, load_settings
from sdtune.train.lora import Network, kohya_clip_skip, te_targets, train_lora, unet_targets
from sdtune.train.scan import scan_folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    sub = folder / "2_shapes"
    sub.mkdir()
    world.write_dataset(sub, world.concept_scenes(4, seed=3, style="outline"), template=None, with_style=False)
    return folder


def settings(dataset, out, **kw):
    return LoraSettings(**{**dict(data=str(dataset), out=str(out), steps=3, batch_size=2, rank=4, alpha=2, lr=5e-3,
                                  sample_steps=2, progress=False), **kw})


def test_target_sets(base):
    unet, te = base.unet, base.text_encoder
    attn = unet_targets(unet, "attn", with_convs=False)
    ff = unet_targets(unet, "attn+ff", with_convs=False)
    everything = unet_targets(unet, "all", with_convs=False)
    assert attn and all(re.search(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", p) for p in attn)
    blocks = sum(1 for n, _ in unet.named_modules() if re.search(r"transformer_blocks\.\d+$", n))
    assert len(attn) == blocks * 8  # attn1 and attn2: q, k, v, out each
    extra = set(ff) - set(attn)
    assert extra and all(re.search(r"(ff\.net\.(0\.proj|2)|proj_in|proj_out)$", p) for p in extra)
    convs = set(everything) - set(ff)
    assert any(p.endswith("resnets.0.conv1") for p in convs) and any("downsamplers.0.conv" in p for p in convs)
    assert any(p.endswith("time_emb_proj") for p in convs) and any("upsamplers.0.conv" in p for p in convs)
    assert unet_targets(unet, "attn", with_convs=True) == sorted(set(attn) | convs, key=everything.index)
    assert len(te_targets(te, "attn")) == 3 * 4 and len(te_targets(te, "attn+ff")) == 3 * 6


def test_exclude_leaves_layers_out_and_reads_back_from_the_settings_file(base, dataset, tmp_path, capsys):
    kept = Network(base, settings(dataset, tmp_path, targets="all", text_encoder=True)).layers
    pattern = [r"attn2\.to_[kv]$", r"^text_encoder\..*layers\.0\."]
    left = Network(base, settings(dataset, tmp_path, targets="all", text_encoder=True, exclude=pattern)).layers
    gone = set(kept) - set(left)
    assert set(left) <= set(kept)
    assert {p for c, p in gone if c == "unet"} == {p for c, p in kept if c == "unet" and re.search(r"attn2\.to_[kv]$", p)}
    assert {c for c, _ in gone} == {"unet", "text_encoder"}
    assert all(".layers.0." in p for c, p in gone if c == "text_encoder")
    # a settings file keeps the patterns (backslashes included) and a run with them trains and saves
    assert main(["train", "lora", "--model", "tiny-random", "--data", str(dataset), "--out", str(tmp_path / "run"),
                 "--steps", "1", "--batch-size", "1", "--sample-every", "0", "--exclude", pattern[0]]) == 0
    again = load_settings(tmp_path / "run" / "settings.toml", {}, "lora")
    assert again.exclude == [pattern[0]]
    paths = [p for c, p, _ in load_lora(tmp_path / "run" / "lora.safetensors").items() if c == "unet"]
    assert not any(re.search(pattern[0], p) for p in paths) and any(p.endswith("attn2.to_q") for p in paths)
    capsys.readouterr()
    assert main(["train", "lora", "--model", "tiny-random", "--data", str(dataset), "--out", str(tmp_path / "bad"),
                 "--exclude", "attn2.(to_k"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--exclude 'attn2.(to_k': not a regular expression" in err[0]
    with pytest.raises(SdtuneError, match=r"^--exclude attn: leaves none of the \d+ layers --targets attn picks in "
                                          r"the unet; narrow the pattern \(it is searched in names such as unet\."):
        Network(base, settings(dataset, tmp_path, targets="attn", exclude=["attn"]))


def test_a_rank_above_every_layer_it_trains_is_refused_before_any_is_made(base, dataset, tmp_path, capsys):
    full = max(min(m.weight.shape[0], m.weight[0].numel()) for p, m in base.unet.named_modules()
               if isinstance(m, torch.nn.Linear) and p in set(unet_targets(base.unet, "attn", False)))
    assert len(Network(base, settings(dataset, tmp_path, targets="attn", rank=full)).layers)  # the largest: kept
    with pytest.raises(SdtuneError, match=rf"^--rank {full + 1}: above the full rank of every layer it trains \(the "
                                          rf"largest is {full}\); choose {full} or less"):
        Network(base, settings(dataset, tmp_path, targets="attn", rank=full + 1))
    with pytest.raises(SdtuneError, match=r"^--conv-rank 100000: above the full rank of every layer"):
        Network(base, settings(dataset, tmp_path, targets="attn", conv_rank=100000))
    assert main(["train", "lora", "--model", "tiny-random", "--data", str(dataset), "--out", str(tmp_path / "big"),
                 "--rank", "100000"]) == 2  # the UI's train form starts this command: one line, not an allocation
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rank 100000: above the full rank of every layer it trains" in err[0]


@pytest.mark.parametrize("algo, rank", [("lora", 2), ("loha", 2), ("lokr", 1), ("lokr", 4), ("dora", 2),
                                        ("oft", 2), ("oft", 3)])
def test_each_trainable_layer_starts_at_the_base_and_adds_what_its_file_applies(algo, rank):
    """The layer a run trains (LoRA's, or LoHa's, LoKr's, DoRA's and OFT's, which compute with the functions that
    apply a file) gives, once trained, what the saved adapter applied to the layer gives; LoKr's w2 is split at a
    rank below half its larger side, whole (scale 1) above; OFT's blocks are LyCORIS's split of the output width
    (6 at rank 2 or 3: 3 blocks of 2), its alpha the constraint (1.0: Q's norm held to 6, as it is here)."""
    g = torch.Generator().manual_seed(0)
    for layer in (torch.nn.Linear(8, 6), torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)):
        trained = algos.get(algo).layer(layer, rank=rank, alpha=1.0, dropout=0.0, generator=g)
        x = torch.randn(2, 8) if isinstance(layer, torch.nn.Linear) else torch.randn(2, 4, 8, 8)
        assert torch.equal(trained(x), layer(x))  # one factor starts at zero
        with torch.no_grad():
            for p in trained.parts().values():
                p.normal_(generator=g)
                if algo == "oft":
                    p.mul_(10)  # past the constraint
        adapter = Adapter(algo, trained.tensors(), 1.0)
        merged = copy.deepcopy(layer)
        with torch.no_grad():
            merged.weight.copy_(adapter.apply(layer.weight, 1.0))
        assert torch.allclose(trained(x), merged(x), atol=1e-4)
        if algo in ("loha", "lokr"):  # with dropout (off here: eval mode) the change is a product of its own
            dropping = algos.get(algo).layer(layer, rank=rank, alpha=1.0, dropout=0.3, generator=g).eval()
            dropping.load_state_dict(trained.state_dict())
            assert torch.allclose(dropping(x), merged(x), atol=1e-4)
        if algo == "lokr":
            assert ("w2" in adapter.tensors) == (rank == 4) and adapter.scale == (1.0 if rank == 4 else 1.0 / rank)
        if algo == "oft":
            assert adapter.tensors["blocks"].shape == (3, 2, 2) and adapter.scale == 1.0
            q = adapter.tensors["blocks"] - adapter.tensors["blocks"].transpose(1, 2)
            assert torch.linalg.vector_norm(q) > 6  # the constraint acted: the trained weight is the held one


@pytest.mark.parametrize("options, rank, roles, w1", [
    ({"full_matrix": True}, 1, {"w1", "w2"}, (4, 4)),  # whole at any rank: scale 1
    ({"decompose_both": True}, 1, {"w1a", "w1b", "w2a", "w2b"}, (4, 4)),  # rank 1 < half of w1's 4 x 4: split
    ({"decompose_both": True}, 2, {"w1", "w2a", "w2b"}, (4, 4)),  # 2 is not below half of 4: w1 whole
    ({"unbalanced": True}, 1, {"w1", "w2a", "w2b"}, (8, 4)),  # the output's larger factor (8 of 4 x 8) in w1
])
def test_lokr_layer_options_shape_the_factors_as_lycoris(options, rank, roles, w1):
    """LyCORIS's full_matrix, decompose_both and unbalanced_factorization, on a Linear(16 -> 32): 32 = 4 x 8 and
    16 = 4 x 4; the layer starts at the base and, trained, gives what its saved adapter applies."""
    g = torch.Generator().manual_seed(1)
    layer = torch.nn.Linear(16, 32)
    trained = algos.get("lokr").layer(layer, rank=rank, alpha=1.0, dropout=0.0, generator=g, **options)
    assert set(trained.parts()) == roles
    made = trained.tensors()
    assert (made["w1"].shape if "w1" in made else (made["w1a"].shape[0], made["w1b"].shape[1])) == w1
    x = torch.randn(3, 16)
    assert torch.equal(trained(x), layer(x))
    with torch.no_grad():
        for p in trained.parts().values():
            p.normal_(generator=g)
    adapter = Adapter("lokr", trained.tensors(), 1.0)
    assert adapter.scale == (1.0 if "w2" in roles and "w1" in roles else 1.0 / rank)  # LyCORIS's alpha / lora_dim
    merged = copy.deepcopy(layer)
    with torch.no_grad():
        merged.weight.copy_(adapter.apply(layer.weight, 1.0))
    assert torch.allclose(trained(x), merged(x), atol=1e-4)


@pytest.mark.parametrize("on_input", [False, True])
def test_ia3_layer_scales_rows_or_input_channels_from_zero_as_its_file_applies(on_input):
    """LyCORIS's IA3: a scale per output row (train_on_input: per input channel), [n] or a conv's [1, n, 1, 1],
    from 0 (the base exactly), saved with its on_input flag and applied by the function that applies a file."""
    g = torch.Generator().manual_seed(5)
    for layer in (torch.nn.Linear(8, 6), torch.nn.Conv2d(4, 6, 3, padding=1)):
        trained = algos.get("ia3").layer(layer, rank=4, alpha=1.0, dropout=0.0, generator=g, on_input=on_input)
        n = layer.weight.shape[1 if on_input else 0]
        assert trained.parts()["scale"].shape == ((n,) if layer.weight.dim() == 2 else (1, n, 1, 1))
        x = torch.randn(2, 8) if isinstance(layer, torch.nn.Linear) else torch.randn(2, 4, 5, 5)
        assert torch.equal(trained(x), layer(x))
        with torch.no_grad():
            trained.parts()["scale"].normal_(generator=g)
        adapter = Adapter("ia3", trained.tensors(), None)
        assert bool(adapter.tensors["on_input"]) == on_input
        merged = copy.deepcopy(layer)
        with torch.no_grad():
            merged.weight.copy_(adapter.apply(layer.weight, 1.0))
        assert torch.allclose(trained(x), merged(x), atol=1e-5)
    other = algos.get("ia3").layer(layer, rank=4, alpha=1.0, dropout=0.0, generator=g, on_input=not on_input)
    with pytest.raises(SdtuneError, match="--ia3-on-input$"):
        other.take(adapter.tensors)


# each algorithm's roles on a 3x3 convolution with LyCORIS's Tucker core (the linear layer keeps its plain ones)
TUCKER_ROLES = {"lora": {"down", "mid", "up"}, "loha": {"t1", "w1a", "w1b", "t2", "w2a", "w2b"},
                "lokr": {"w1", "t2", "w2a", "w2b"}, "dora": {"down", "mid", "up", "dora_scale"}}


@pytest.mark.parametrize("algo", list(TUCKER_ROLES))
@pytest.mark.parametrize("tucker, scalar", [(True, False), (False, True), (True, True)])
def test_tucker_and_scalar_layers_start_at_the_base_and_save_what_they_apply(algo, tucker, scalar):
    """LyCORIS's use_tucker (a 3x3 conv's change through a core [r, r, 3, 3] between 1x1 factors, kept in the
    file) and use_scalar (a learned scalar from 0 on the change, every factor random; saved folded into the first
    factor, as LyCORIS saves it): the layer starts at the base exactly and, trained, gives what its file applies."""
    g = torch.Generator().manual_seed(3)
    rank = 1 if algo == "lokr" else 2  # (LoKr's w2 is split only below half its side)
    for layer in (torch.nn.Linear(8, 6), torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)):
        trained = algos.get(algo).layer(layer, rank=rank, alpha=1.0, dropout=0.0, generator=g, tucker=tucker,
                                        scalar=scalar)
        conv = isinstance(layer, torch.nn.Conv2d)
        made = trained.tensors()
        assert (set(made) == TUCKER_ROLES[algo]) == (tucker and conv), set(made)
        if scalar:  # the scalar at 0 holds the change at zero; every factor starts random
            assert trained.parts()["scalar"].item() == 0.0
            assert all(p.abs().max() > 0 for role, p in trained.parts().items() if role != "scalar")
        x = torch.randn(2, 4, 8, 8) if conv else torch.randn(2, 8)
        assert torch.equal(trained(x), layer(x))
        with torch.no_grad():
            for p in trained.parts().values():
                p.normal_(generator=g)
        adapter = Adapter(algo, algos.get(algo).build(trained.tensors()), 1.0)  # as the file is read
        merged = copy.deepcopy(layer)
        with torch.no_grad():
            merged.weight.copy_(adapter.apply(layer.weight, 1.0))
        assert torch.allclose(trained(x), merged(x), atol=1e-4)
        if scalar and algo != "dora":  # the saved factors hold the scalar: what the run would save without one,
            # times it (DoRA's renormalised weight is no linear function of ΔW)
            s = trained.parts()["scalar"].item()
            with torch.no_grad():
                trained.scalar.fill_(1.0)
            plain = Adapter(algo, algos.get(algo).build(trained.tensors()), 1.0).apply(layer.weight, 1.0)
            assert torch.allclose(merged.weight - layer.weight, s * (plain - layer.weight), atol=1e-5)


def test_dora_layer_takes_lycoris_dropouts_on_its_change():
    """Module dropout computes with W0 alone; rank dropout zeroes output rows of ΔW before the renormalisation (in
    training mode only: eval gives what the file applies)."""
    g = torch.Generator().manual_seed(7)
    layer = torch.nn.Linear(8, 6)
    x = torch.randn(3, 8)
    skipped = algos.get("dora").layer(layer, 2, 1.0, 0.0, g, module_dropout=1.0)
    with torch.no_grad():
        skipped.up.weight.normal_(generator=g)
    assert torch.equal(skipped(x), layer(x)) and not torch.equal(skipped.eval()(x), layer(x))
    dropping = algos.get("dora").layer(layer, 2, 1.0, 0.0, g, rank_dropout=0.5)
    with torch.no_grad():
        dropping.up.weight.normal_(generator=g)
    torch.manual_seed(0)
    y = dropping(x)
    torch.manual_seed(0)
    keep = (torch.rand(6) >= 0.5).float() / 0.5
    t = {"down": dropping.down.weight, "up": dropping.up.weight * keep[:, None], "dora_scale": dropping.dora_scale}
    want = torch.nn.functional.linear(x, algos.get("dora").merged(layer.weight, t, dropping.scale), layer.bias)
    assert torch.allclose(y, want, atol=1e-6) and not torch.allclose(dropping.eval()(x), y)


def test_a_tucker_locon_file_continues_only_in_a_tucker_run():
    """--network-weights: the Tucker core is taken as it is; a layer without one is one line naming the flag."""
    g = torch.Generator().manual_seed(4)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    tucker = algos.get("lora").layer(conv, rank=2, alpha=1.0, dropout=0.0, generator=g, tucker=True)
    with torch.no_grad():
        for p in tucker.parts().values():
            p.normal_(generator=g)
    again = algos.get("lora").layer(conv, rank=2, alpha=1.0, dropout=0.0, generator=g, tucker=True, scalar=True)
    again.take(tucker.tensors())
    x = torch.randn(1, 4, 5, 5)
    assert torch.equal(again(x), tucker(x)) and again.parts()["scalar"].item() == 1.0
    plain = algos.get("lora").layer(conv, rank=2, alpha=1.0, dropout=0.0, generator=g)
    with pytest.raises(SdtuneError, match="^its LoCon layers have Tucker cores, and this run trains none; add "
                                          "--tucker$"):
        plain.take(tucker.tensors())
    with pytest.raises(SdtuneError, match="have no Tucker cores, and this run trains some; leave out --tucker$"):
        tucker.take(plain.tensors())


def test_norm_layer_starts_at_the_base_and_changes_scale_and_bias_as_its_file_applies():
    """LyCORIS's train_norm module on a LayerNorm and a GroupNorm: w_norm and b_norm from zero (the base exactly),
    trained, give what the saved norm adapter applies to the scale and (its bias part) the bias."""
    g = torch.Generator().manual_seed(6)
    for norm, x in ((torch.nn.LayerNorm(8), torch.randn(2, 3, 8)), (torch.nn.GroupNorm(2, 8), torch.randn(2, 8, 4, 4))):
        with torch.no_grad():
            norm.weight.normal_(generator=g)
            norm.bias.normal_(generator=g)
        trained = algos.get("norm").layer(norm)
        assert set(trained.parts()) == {"weight", "bias"} and torch.equal(trained(x), norm(x))
        with torch.no_grad():
            for p in trained.parts().values():
                p.normal_(generator=g)
        adapter = Adapter("norm", trained.tensors())
        merged = copy.deepcopy(norm)
        with torch.no_grad():
            merged.weight.copy_(adapter.apply(norm.weight, 1.0))
            merged.bias.copy_(adapter.bias_part().apply(norm.bias, 1.0))
        assert torch.allclose(trained(x), merged(x), atol=1e-5)
        assert torch.equal(merged.weight, norm.weight + trained.parts()["weight"])


def test_full_layer_learns_the_whole_weight_and_bias_change_from_zero_as_its_file_applies():
    """LyCORIS full (native fine-tuning kept as a file): the weight's whole change and the bias's, from zero (the base
    exactly), saved as diff and diff_b and applied by the functions that apply a file (the bias at the same
    strength); rank dropout takes a row's bias change with its weight change."""
    g = torch.Generator().manual_seed(7)
    for layer in (torch.nn.Linear(8, 6), torch.nn.Linear(8, 6, bias=False), torch.nn.Conv2d(4, 6, 3, padding=1)):
        trained = algos.get("full").layer(layer, rank=4, alpha=1.0, dropout=0.0, generator=g)
        with_bias = layer.bias is not None
        assert {k: tuple(p.shape) for k, p in trained.parts().items()} == \
            {"diff": tuple(layer.weight.shape), **({"bias": (6,)} if with_bias else {})}
        x = torch.randn(2, 8) if isinstance(layer, torch.nn.Linear) else torch.randn(2, 4, 5, 5)
        assert torch.equal(trained(x), layer(x))
        with torch.no_grad():
            for p in trained.parts().values():
                p.normal_(generator=g)
        adapter = Adapter("diff", trained.tensors(), None)
        merged = copy.deepcopy(layer)
        with torch.no_grad():
            merged.weight.copy_(adapter.apply(layer.weight, 1.0))
            if with_bias:
                merged.bias.copy_(adapter.bias_part().apply(layer.bias, 1.0))
        assert (adapter.bias_part() is not None) == with_bias
        assert torch.allclose(trained(x), merged(x), atol=1e-5)
    dropped = algos.get("full").layer(layer, rank=4, alpha=1.0, dropout=0.0, generator=g, rank_dropout=0.5).train()
    with torch.no_grad():
        for p in dropped.parts().values():
            p.normal_(generator=g)
    changes = torch.stack([dropped(x) - layer(x) for _ in range(200)])  # per output channel: all of it, or none
    full = dropped.eval()(x) - layer(x)
    per_row = (changes * full).sum([1, 3, 4]) / (full * full).sum([0, 2, 3])
    assert set(per_row.round(decimals=3).unique().tolist()) == {0.0, 2.0}


def test_oft_rescaled_layer_learns_a_factor_per_output_row_that_its_file_applies():
    """LyCORIS's rescaled diag-OFT: a rescale per output row, starting at 1 (the base exactly), saved as the file's
    ``rescale`` and applied with the rotation by the function that applies a file."""
    g = torch.Generator().manual_seed(2)
    for layer in (torch.nn.Linear(8, 6), torch.nn.Conv2d(4, 6, 3, padding=1)):
        trained = algos.get("oft").layer(layer, rank=2, alpha=0.0, dropout=0.0, generator=g, rescaled=True)
        assert set(trained.parts()) == {"blocks", "rescale"}
        assert trained.parts()["rescale"].shape == (6, *[1] * (layer.weight.dim() - 1))
        x = torch.randn(2, 8) if isinstance(layer, torch.nn.Linear) else torch.randn(2, 4, 5, 5)
        assert torch.allclose(trained(x), layer(x), atol=1e-6)  # R = I and rescale 1
        with torch.no_grad():
            for p in trained.parts().values():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        adapter = Adapter("oft", trained.tensors(), 0.0)
        merged = copy.deepcopy(layer)
        with torch.no_grad():
            merged.weight.copy_(adapter.apply(layer.weight, 1.0))
        assert torch.allclose(trained(x), merged(x), atol=1e-4)
        unscaled = Adapter("oft", {"blocks": adapter.tensors["blocks"]}, 0.0).apply(layer.weight, 1.0)
        flat = adapter.tensors["rescale"].reshape(6, *[1] * (layer.weight.dim() - 1))
        assert torch.allclose(merged.weight, unscaled * flat, atol=1e-6)  # each output row times its factor


def test_boft_layer_is_a_butterfly_split_as_lycoris_splits_it_and_adds_what_its_file_applies():
    """BOFT's blocks: the largest even size up to the rank that leaves a power-of-two count (LyCORIS's
    butterfly_factor), in log2(count) + 1 stages; a width with none is one line naming the rank to give."""
    assert [butterfly_split(w, 16) for w in (320, 640, 768, 1280)] == [(10, 32), (10, 64), (12, 64), (10, 128)]
    assert butterfly_split(320, 8) is None and butterfly_split(32, 4) == (4, 8) and butterfly_split(16, 16) == (16, 1)
    g = torch.Generator().manual_seed(3)
    for layer in (torch.nn.Linear(8, 16), torch.nn.Conv2d(4, 16, 3, padding=1)):
        trained = algos.get("oft").layer(layer, rank=4, alpha=0.05, dropout=0.0, generator=g, butterfly=True)
        assert trained.parts()["blocks"].shape == (3, 4, 4, 4)  # 16 = 4 blocks of 4: 3 stages
        x = torch.randn(2, 8) if isinstance(layer, torch.nn.Linear) else torch.randn(2, 4, 5, 5)
        assert torch.allclose(trained(x), layer(x), atol=1e-6)
        with torch.no_grad():
            trained.parts()["blocks"].normal_(generator=g)  # past the constraint (0.05 x 16)
        adapter = Adapter("oft", trained.tensors(), 0.05)
        assert adapter.algo.lycoris_label(adapter.tensors) == "BOFT"
        merged = copy.deepcopy(layer)
        with torch.no_grad():
            merged.weight.copy_(adapter.apply(layer.weight, 1.0))
        assert torch.allclose(trained(x), merged(x), atol=1e-4)
    with pytest.raises(SdtuneError, match=r"^BOFT at rank 2: an output width of 24 has no even block size up to 2 "
                                          r"that leaves a power-of-two number of blocks"):
        algos.get("oft").layer(torch.nn.Linear(8, 24), rank=2, alpha=0.0, dropout=0.0, generator=g, butterfly=True)


def test_oft_in_a_count_of_blocks_splits_every_width_into_that_many(base, dataset, tmp_path):
    """--oft-blocks (kohya's networks.oft, whose network_dim counts blocks): k blocks of out/k rows in every
    layer, whatever its width; a width that does not split is one line naming the layer."""
    g = torch.Generator().manual_seed(4)
    for layer in (torch.nn.Linear(8, 12), torch.nn.Conv2d(4, 12, 3, padding=1)):
        trained = algos.get("oft").layer(layer, rank=2, alpha=0.0, dropout=0.0, generator=g, blocks=3)
        assert trained.parts()["blocks"].shape == (3, 4, 4)
    network = Network(base, settings(dataset, tmp_path, algo="oft", oft_blocks=4, alpha=0.0, conv_rank=4))
    widths = {layer.base.weight.shape[0] for layer in network.layers.values()}
    assert len(widths) > 1 and any(isinstance(m.base, torch.nn.Conv2d) for m in network.layers.values())
    for layer in network.layers.values():
        out = layer.base.weight.shape[0]
        assert layer.parts()["blocks"].shape == (4, out // 4, out // 4)
    with pytest.raises(SdtuneError, match=r"^OFT in 5 blocks: an output width of 12 does not split into 5 equal"):
        algos.get("oft").layer(torch.nn.Linear(8, 12), rank=2, alpha=0.0, dropout=0.0, generator=g, blocks=5)
    for kw, says in ((dict(algo="lora"), r"counts the blocks of an --algo oft run"),
                     (dict(algo="oft", oft_butterfly=True), r"BOFT \(--oft-butterfly\) sizes its blocks from --rank"),
                     (dict(algo="oft", oft_blocks=1), r"must be 2 or more")):
        with pytest.raises(SdtuneError, match=r"^--oft-blocks \d: " + says):
            settings(dataset, tmp_path, **{"oft_blocks": 3, **kw}).check()


def test_train_norm_with_every_norm_excluded_is_one_line(base, dataset, tmp_path):
    with pytest.raises(SdtuneError, match=r"^--train-norm: no norm layer of the UNet is left to train"):
        Network(base, settings(dataset, tmp_path, targets="attn+ff", train_norm=True, exclude=[r"norm\d?$"]))
    assert any(isinstance(layer, algos.get("norm").layer) for layer in Network(base, settings(
        dataset, tmp_path, targets="attn+ff", train_norm=True, exclude=[r"norm1$"])).layers.values())


def test_a_width_boft_cannot_split_is_refused_naming_its_layer(base, dataset, tmp_path):
    unet = copy.deepcopy(base.unet)
    unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q = torch.nn.Linear(
        unet.config.block_out_channels[0], 24)
    with_odd = copy.copy(base)
    with_odd.unet = unet
    with pytest.raises(SdtuneError, match=r"^unet\.down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q: "
                                          r"BOFT at rank 2: an output width of 24 has no even block size"):
        Network(with_odd, settings(dataset, tmp_path, algo="oft", oft_butterfly=True, rank=2, alpha=0.0))


def test_tag_frequency_names_folders_as_the_dataset_dirs_do(tmp_path):
    for rel, caption in (("2_blue/sub/a.png", "blue, star"), ("2_blue/b.png", "blue"), ("c.png", "red")):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / rel)
        (tmp_path / rel).with_suffix(".txt").write_text(caption)
    scan = scan_folder(tmp_path)
    assert set(scan.folders) == {"2_blue", "."}
    assert lora_train._tag_frequency(scan) == {"2_blue": {"blue": 2, "star": 1}, ".": {"red": 1}}


def test_trained_kohya_file_loads_back_and_matches_the_trained_network(base, dataset, tmp_path):
    s = settings(dataset, tmp_path, targets="all", conv_rank=2, conv_alpha=1, text_encoder=True, te_lr=1e-3)
    pristine = {c: {k: v.clone() for k, v in getattr(base, c).state_dict().items()} for c in ("unet", "text_encoder")}
    path = train_lora(base, s)
    for comp in ("unet", "text_encoder"):  # the base is unchanged
        now = getattr(base, comp).state_dict()
        assert now.keys() == pristine[comp].keys() and all(torch.equal(now[k], v) for k, v in pristine[comp].items())

    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert any(k.startswith("lora_unet_down_blocks_0_resnets_0_conv1.lora_down") for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2.0" and json.loads(meta["ss_network_args"])["conv_dim"] == "2"
    assert meta["ss_steps"] == "3" and meta["ss_num_train_images"] == "8" and meta["ss_text_encoder_lr"] == "0.001"
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_shapes": {"n_repeats": 2, "img_count": 4}}
    tags = json.loads(meta["ss_tag_frequency"])["2_shapes"]
    assert sum(tags.values()) >= 4 and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_v_parameterization"] == "False" and meta["ss_resolution"] == "(64, 64)"  # the training size
    assert meta["ss_mixed_precision"] == "no"  # what "auto" became on this device, as kohya writes it
    # the whole settings ride along: read back, they are the run's (what --config would rerun)
    (tmp_path / "from-metadata.toml").write_text(meta["ss_sdtune_settings"])
    again = load_settings(tmp_path / "from-metadata.toml", kind="lora")  # all but the terminal's progress bar
    assert again == dataclasses.replace(s, progress=again.progress) and meta["ss_sdtune_preset"] == ""
    assert meta["ss_sdtune_version"] == sdtune.__version__  # the tool that made it, for bug reports

    lora = load_lora(path)
    conv = lora.modules["unet"]["down_blocks.0.resnets.0.conv1"]
    assert conv.rank == 2 and conv.alpha == 1 and conv.tensors["down"].shape[2:] == (3, 3)
    attn = lora.modules["unet"]["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert attn.rank == 4 and attn.alpha == 2 and attn.tensors["up"].abs().max() > 0
    assert lora.modules["text_encoder"]["encoder.layers.0.self_attn.q_proj"].tensors["up"].abs().max() > 0

    # the file, merged by sdtune's patcher, gives what the trained network computed
    network = Network(base, s)
    state = {}
    for comp, p, ad in lora.items():
        state[f"{comp}:{p}.down"], state[f"{comp}:{p}.up"] = ad.tensors["down"], ad.tensors["up"]
    network.load_state(state, path)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    ids = base.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    network.inject()
    try:
        with torch.no_grad():
            ctx = base.text_encoder(ids)[0]
            want = base.unet(x, 500, ctx).sample
    finally:
        network.remove()
    loras = LoraSet.attach(base)
    loras.add("trained", path, 1.0)
    try:
        with torch.no_grad():
            got = base.unet(x, 500, base.text_encoder(ids)[0]).sample
    finally:
        loras.detach()
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def in_diffusers(base, folder, diffusers_says):
    """A diffusers pipeline on copies of ``base``'s UNet and text encoder with the LoRA of ``folder`` loaded, each key
    of it matched: (pipeline, its UNet, its text encoder)."""
    unet, text = copy.deepcopy(base.unet), copy.deepcopy(base.text_encoder)
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=text, tokenizer=base.tokenizer, unet=unet,
                                   scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    said = diffusers_says(lambda: pipe.load_lora_weights(str(folder), adapter_name="trained"))
    assert not re.search(r"unexpected|did not match|missing", said, re.IGNORECASE), said[-2000:]
    return pipe, unet, text


@pytest.mark.parametrize("switches", [{}, {"tucker": True, "scalar": True}], ids=["lora", "tucker-scalar"])
def test_diffusers_file_loads_in_diffusers_with_no_unmatched_keys(base, dataset, tmp_path, diffusers_says, switches):
    """(LyCORIS's Tucker cores, which PEFT's layout has no place for, folded into lora_A; the scalars in lora_B.)"""
    s = settings(dataset, tmp_path, targets="attn+ff", conv_rank=2, text_encoder=True, formats=["diffusers"],
                 **switches)
    kohya = train_lora(base, s)
    path = tmp_path / "diffusers" / "pytorch_lora_weights.safetensors"
    assert path.is_file()
    pipe, unet, text = in_diffusers(base, tmp_path / "diffusers", diffusers_says)
    lora = load_lora(kohya)
    assert any("mid" in ad.tensors for _, _, ad in lora.items()) == bool(switches)
    for comp, model in (("unet", unet), ("text_encoder", text)):
        wrapped = {n.removeprefix("text_model.") for n, m in model.named_modules() if hasattr(m, "lora_A")}
        assert wrapped == set(lora.modules[comp]), comp
    pipe.fuse_lora(adapter_names=["trained"], lora_scale=1.0)
    for comp, model in (("unet", unet), ("text_encoder", text)):
        for p, ad in lora.modules[comp].items():
            mod = model.get_submodule(p)
            fused = (mod.base_layer if hasattr(mod, "base_layer") else mod).weight.detach()
            w0 = getattr(base, comp).get_submodule(p).weight.detach()
            want = w0 + ad.delta(w0.shape)
            assert torch.allclose(fused, want, atol=1e-6), (comp, p)


def test_dora_per_output_row_trains_and_its_diffusers_file_fuses_in_diffusers_as_sdtune_applies_it(
        base, dataset, tmp_path, diffusers_says):
    """--dora-wd-on-output: a magnitude per output row (LyCORIS's wd_on_output, PEFT's axis), starting at the base;
    the kohya file holds it as dora_scale [out, 1], the diffusers file as PEFT's lora_magnitude_vector, which
    diffusers' load_lora_weights + fuse_lora take to the weights sdtune applies (PEFT adds no eps to the norm: a
    difference at float32 rounding)."""
    layer = torch.nn.Conv2d(4, 6, 3, padding=1)
    g = torch.Generator().manual_seed(4)
    dora = algos.get("dora").layer(layer, rank=2, alpha=2.0, dropout=0.0, generator=g, on_output=True)
    assert dora.parts()["dora_scale"].shape == (6, 1, 1, 1)
    x = torch.randn(2, 4, 5, 5)
    assert torch.allclose(dora(x), layer(x), atol=1e-6)
    s = settings(dataset, tmp_path, algo="dora", dora_wd_on_output=True, targets="attn", text_encoder=True,
                 formats=["kohya", "diffusers"], lr=1e-2)
    kohya = train_lora(base, s)
    lora = load_lora(kohya)
    assert all(ad.tensors["dora_scale"].shape == (ad.tensors["up"].shape[0], 1) for _, _, ad in lora.items())
    args = json.loads(read_metadata(kohya)["ss_network_args"])
    assert args["dora_wd"] == "True" and args["wd_on_output"] == "True"
    pipe, unet, text = in_diffusers(base, tmp_path / "diffusers", diffusers_says)
    pipe.fuse_lora(adapter_names=["trained"], lora_scale=1.0)
    moved = 0
    for comp, model in (("unet", unet), ("text_encoder", text)):
        for p, ad in lora.modules[comp].items():
            mod = model.get_submodule(p)
            fused = (mod.base_layer if hasattr(mod, "base_layer") else mod).weight.detach()
            w0 = getattr(base, comp).get_submodule(p).weight.detach()
            want = ad.apply(w0, 1.0)
            moved += not torch.allclose(want, w0, atol=1e-4)
            assert torch.allclose(fused, want, atol=1e-5), (comp, p, (fused - want).abs().max())
    assert moved  # it learned
    # --network-weights: a DoRA continues on its own axis (PEFT's magnitude is per row); the other is one line
    column = algos.get("dora").layer(layer, rank=2, alpha=2.0, dropout=0.0, generator=g)
    with pytest.raises(SdtuneError, match=r"^its DoRA magnitude is per output row, and this run trains one per "
                                          r"input column; add --dora-wd-on-output$"):
        column.take(dora.tensors())
    peft_form = {k: v for k, v in dora.tensors().items() if k != "dora_scale"}
    dora.take({**peft_form, "magnitude": torch.full((1, 6, 1, 1), 2.0)})
    assert torch.equal(dora.parts()["dora_scale"], torch.full((6, 1, 1, 1), 2.0))


def test_no_unet_trains_the_text_encoder_only_and_diffusers_loads_it(base, dataset, tmp_path, diffusers_says,
                                                                      capsys):
    """kohya's --network_train_text_encoder_only: --no-unet --text-encoder, through the command; the UNet is left
    alone (no layer of it in the files) and the text encoder's layers learn; diffusers loads the file cleanly."""
    out = tmp_path / "te"
    assert main(["train", "lora", "--model", "tiny-random", "--data", str(dataset), "--out", str(out), "--steps", "2",
                 "--rank", "4", "--alpha", "4", "--lr", "5e-3", "--no-unet", "--text-encoder", "--formats", "kohya",
                 "diffusers", "--sample-every", "0", "--no-report", "--no-progress"]) == 0
    lora = load_lora(out / "lora.safetensors")
    assert {comp for comp, layers in lora.modules.items() if layers} == {"text_encoder"}
    assert all(ad.tensors["up"].abs().sum() > 0 for ad in lora.modules["text_encoder"].values())
    meta = lora.metadata
    assert meta["ss_unet_lr"] == "None" and meta["ss_text_encoder_lr"] == "0.005"
    text = copy.deepcopy(base.text_encoder)
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=text, tokenizer=base.tokenizer,
                                   unet=copy.deepcopy(base.unet), scheduler=base.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    said = diffusers_says(lambda: pipe.load_lora_weights(str(out / "diffusers"), adapter_name="te"))
    # its one note: the file has no UNet layers, as it should not
    said = re.sub(r"No LoRA keys associated to UNet2DConditionModel found[^\n]*", "", said)
    assert not re.search(r"unexpected|did not match|missing", said, re.IGNORECASE), said[-2000:]
    assert {n.removeprefix("text_model.") for n, m in text.named_modules() if hasattr(m, "lora_A")} == set(
        lora.modules["text_encoder"])
    capsys.readouterr()
    assert main(["train", "lora", "--model", "tiny-random", "--data", str(dataset), "--out", str(tmp_path / "x"),
                 "--no-unet"]) == 2
    assert capsys.readouterr().err.strip() == ("sdtune: error: --no-unet: leaves the LoRA nothing to train; add "
                                               "--text-encoder to train the text encoder(s) only")


def test_te_steps_stops_the_text_encoders_there_and_resumes_exactly(base, dataset, tmp_path):
    whole = resumes_exactly(base, dataset, tmp_path, text_encoder=True, te_steps=1)
    final, step2 = factors(whole), factors(tmp_path / "whole" / "lora-step000002.safetensors")
    te = [k for k in final if k.startswith("text_encoder.")]
    unet = [k for k in final if k.startswith("unet.")]
    assert te and unet
    # the text encoders' layers learned in step 1 (up starts at zero) and never after; the UNet's went on
    assert all(torch.equal(a, b) for k in te for a, b in zip(final[k], step2[k]))
    assert any(final[k][1].abs().max() > 0 for k in te)
    assert any(not torch.equal(final[k][1], step2[k][1]) for k in unet)
    # a UNet-only run is told the option does nothing
    with pytest.warns(SdtuneWarning, match="--te-steps: for the text encoders, but this run trains the UNet only"):
        train_lora(base, settings(dataset, tmp_path / "unet", te_steps=2, steps=1, report=False))
    with pytest.raises(SdtuneError, match=r"--te-steps -1: must be 0 \(all steps\) or more"):
        settings(dataset, tmp_path / "bad", text_encoder=True, te_steps=-1).check()


def test_default_caption_and_missing_captions(base, tmp_path):
    folder = world.write_dataset(tmp_path / "d", world.concept_scenes(2, seed=4))
    (folder / "0000.txt").unlink()
    with pytest.raises(SdtuneError, match=r"0000.png\).*--default-caption"):
        train_lora(base, settings(folder, tmp_path / "o"))
    path = train_lora(base, settings(folder, tmp_path / "o", default_caption="a shape", steps=1))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ss_tag_frequency"])["."]["a shape"] == 1
    assert meta["ss_text_encoder_lr"] == "None"  # a UNet-only run trains no text encoder: no rate to show


def test_lora_dropout_is_off_outside_training(base, dataset, tmp_path):
    s = settings(dataset, tmp_path, lora_dropout=0.5)
    network = Network(base, s)
    layer = next(iter(network.layers.values()))
    network.set_training(True)
    assert layer.dropout.training
    network.set_training(False)
    assert not layer.dropout.training


def test_clip_skip_trains_on_the_layer_it_reads(base, dataset, tmp_path):
    """With clip skip 2 the UNet reads the penultimate layer: the last layer gets no LoRA (it would never learn),
    the samples use the same skip, and the file says so as sd-scripts does (ss_clip_skip)."""
    layers = base.text_encoder.config.num_hidden_layers
    path = train_lora(base, settings(dataset, tmp_path, text_encoder=True, clip_skip=2, steps=1))
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    te_layers = {int(m.group(1)) for k in keys if (m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_", k))}
    assert te_layers == set(range(layers - 1)) and meta["ss_clip_skip"] == "2"
    with pytest.raises(SdtuneError, match=r"--clip-skip 0: must be greater than 0"):
        settings(dataset, tmp_path / "x", clip_skip=0).check()
    for seed in (-1, 2**70):  # the samples' seeds would fail after the images were encoded
        with pytest.raises(SdtuneError, match=rf"^--seed {seed}: must be from 0 to {2**63 - 65}$"):
            settings(dataset, tmp_path / "x", seed=seed).check()
    # sd-scripts counts SD 2.x's skip on the stored encoder, which lacks OpenCLIP's last layer: one less
    counted = {(f.name, n): kohya_clip_skip(f, n)
               for f in (families.SD1, families.SD2, families.SDXL) for n in (1, 2, 3)}
    assert counted == {("sd1", 1): "None", ("sd1", 2): "2", ("sd1", 3): "3", ("sd2", 1): "None", ("sd2", 2): "None",
                       ("sd2", 3): "2", ("sdxl", 1): "None", ("sdxl", 2): "2", ("sdxl", 3): "3"}


def test_a_run_on_a_model_with_loras_merged_says_so(base, dataset, tmp_path):
    """It learns on top of them, and its file works as trained only with them loaded: said, not silent."""
    first = train_lora(base, settings(dataset, tmp_path / "first", steps=1, sample_every=0, report=False))
    base.loras.add("style", first, 1.0)
    try:
        with pytest.warns(UserWarning, match=r"the model has LoRAs merged in \(style\): this run learns on top of "
                                             r"them"):
            train_lora(base, settings(dataset, tmp_path / "second", steps=1, sample_every=0, report=False))
    finally:
        base.loras.remove_all()


def test_save_precision_writes_the_same_weights_in_half_the_bytes(base, dataset, tmp_path):
    """--save-precision fp16/bf16 (kohya's --save_precision): the files hold the fp32 run's weights rounded, training
    and its resume state unchanged; it may change when a run resumes; a value past fp16's range is one line."""
    runs = {p: train_lora(base, settings(dataset, tmp_path / p, save_precision=p, report=False, sample_every=0))
            for p in ("fp32", "fp16", "bf16")}
    with safe_open(runs["fp32"], "pt") as full, safe_open(runs["fp16"], "pt") as half, \
            safe_open(runs["bf16"], "pt") as brain:
        assert full.keys() == half.keys() == brain.keys()
        values = 0
        for key in full.keys():
            if key.endswith(".alpha"):
                continue
            values += full.get_tensor(key).numel()
            assert half.get_tensor(key).dtype == torch.float16 and brain.get_tensor(key).dtype == torch.bfloat16
            assert torch.equal(half.get_tensor(key), full.get_tensor(key).half()), key
            assert torch.equal(brain.get_tensor(key), full.get_tensor(key).bfloat16()), key
    assert runs["fp32"].stat().st_size - runs["fp16"].stat().st_size >= 2 * values - 64  # 2 bytes a value fewer
    assert load_settings(runs["fp16"], kind="lora").save_precision == "fp16"  # in the file's own settings
    network = Network(base, settings(dataset, tmp_path / "x"))
    (comp, path), layer = next(iter(network.layers.items()))
    with torch.no_grad():
        layer.up.weight.fill_(1e6)
    with pytest.raises(SdtuneError, match=rf"^--save-precision fp16: {comp}\.{re.escape(path)} holds values past"):
        network.to_lora("fp16")
    assert network.to_lora("bf16").modules[comp][path].tensors["up"].dtype == torch.bfloat16


def test_network_weights_start_the_run_from_a_file_with_its_own_ranks(base, dataset, tmp_path):
    """--network-weights (kohya's --network_weights): the run starts from the file's factors, each layer at the
    file's rank and alpha; layers the run trains that the file lacks start fresh (said); the file's layers the run
    does not train, or adapters of another algorithm, are one line."""
    first = train_lora(base, settings(dataset, tmp_path / "a", rank=2, alpha=1, text_encoder=True, report=False,
                                      sample_every=0))
    saved = load_lora(first)
    network = Network(base, settings(dataset, tmp_path / "b", rank=8, alpha=8, text_encoder=True,
                                     network_weights=str(first)))
    started = network.to_lora()
    assert {(c, p) for c, p, _ in started.items()} == {(c, p) for c, p, _ in saved.items()}
    for comp, path, ad in saved.items():
        now = started.modules[comp][path]
        assert now.rank == 2 and now.alpha == 1.0, (comp, path)
        assert all(torch.equal(now.tensors[r], ad.tensors[r]) for r in ("down", "up")), (comp, path)
    # continued through the command line: more layers than the file has (attn+ff), the new ones fresh
    with pytest.warns(UserWarning, match=rf"^--network-weights {re.escape(str(first))}: \d+ of the \d+ layers this "
                                         rf"run trains are not in it; they start fresh$"):
        assert main(["train", "lora", "--model", "tiny-random", "--data", str(dataset), "--out", str(tmp_path / "c"),
                     "--steps", "1", "--rank", "2", "--alpha", "1", "--targets", "attn+ff", "--text-encoder",
                     "--network-weights", str(first), "--sample-every", "0", "--no-report", "--no-progress"]) == 0
    assert load_settings(tmp_path / "c" / "lora.safetensors", kind="lora").network_weights == str(first)
    with pytest.raises(SdtuneError, match=r"layers are not ones this run trains \(e\.g\. text_encoder\..*--text-enc"):
        Network(base, settings(dataset, tmp_path / "d", network_weights=str(first)))  # the file's text layers
    with pytest.raises(SdtuneError, match=r"holds LoRA adapters, and this run trains LoKr \(--algo lokr\); give"):
        Network(base, settings(dataset, tmp_path / "e", text_encoder=True, algo="lokr", network_weights=str(first)))


@pytest.mark.parametrize("algo", ["lokr", "loha", "dora", "oft", "ia3"])
def test_network_weights_continue_each_algorithm_with_its_own_shapes(base, dataset, tmp_path, algo):
    first = train_lora(base, settings(dataset, tmp_path / "a", algo=algo, lokr_factor=4, rank=2, report=False,
                                      sample_every=0))
    saved = load_lora(first)
    started = Network(base, settings(dataset, tmp_path / "b", algo=algo, rank=8,
                                     network_weights=str(first))).to_lora()  # other factor and rank: the file's
    for comp, path, ad in saved.items():
        now = started.modules[comp][path]
        assert now.tensors.keys() == ad.tensors.keys() and now.scale == ad.scale, (comp, path)
        assert all(torch.equal(now.tensors[r], ad.tensors[r]) for r in ad.tensors), (comp, path)
