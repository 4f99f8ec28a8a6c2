"""kohya's options for a LoRA's factors: rank and module dropout (what a layer computes with them, in training mode
only, unbiased) and max-norm regularisation (--scale-weight-norms), on LoRA and, as LyCORIS applies them, on LoHa
and LoKr; a run with all of them (and kohya's caption tag dropout) resumes to the uninterrupted weights and records
them as kohya/LyCORIS do; module dropout runs on two processes; what they cannot take is one line."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from small_runs import factors, outline_dataset, resumes_exactly, settings
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from sdtune.lora.algos.ia3 import Ia3Layer
from sdtune.lora.algos.loha import LohaLayer
from sdtune.lora.algos.lokr import LokrLayer
from sdtune.lora.algos.lora import LoraLayer
from sdtune.lora.formats import load_lora
from sdtune.safeio import SdtuneError, read_metadata
from sdtune.train import logs
from sdtune.train import lora as lora_train
from sdtune.train.lora import Network, train_lora


def _layer(base, **kw):
    layer = LoraLayer(base, 4, 4.0, 0.0, torch.Generator().manual_seed(0), **kw)
    with torch.no_grad():
        layer.up.weight.normal_(generator=torch.Generator().manual_seed(1))  # a branch that is not zero
    return layer


LAYERS = [pytest.param(lambda: nn.Linear(6, 5), (3, 7, 6), id="linear-tokens"),
          pytest.param(lambda: nn.Linear(6, 5), (3, 6), id="linear"),
          pytest.param(lambda: nn.Conv2d(6, 5, 3, padding=1), (3, 6, 4, 4), id="conv")]


@pytest.mark.parametrize("make, shape", LAYERS)
def test_rank_dropout_drops_branch_channels_per_sample_and_is_unbiased(make, shape):
    torch.manual_seed(0)
    base = make()
    plain, dropped = _layer(base), _layer(base, rank_dropout=0.5)
    x = torch.randn(shape)
    with torch.no_grad():
        full = plain(x) - base(x)
        dropped.eval()
        assert torch.equal(dropped(x), plain(x))  # in eval mode (sampling, validation): the whole branch
        dropped.train()
        draws = torch.stack([dropped(x) - base(x) for _ in range(4000)])
    # per sample: the samples of one forward are not all dropped alike
    assert any(not torch.allclose(d[0] / full[0], d[1] / full[1]) for d in draws[:10])
    # the mean branch is the full one (the 1/(1 - p) scale), within the average's noise
    assert torch.allclose(draws.mean(0), full, atol=0.06 * full.abs().max().item())


@pytest.mark.parametrize("make, shape", LAYERS[::2])
def test_module_dropout_skips_the_whole_branch_with_its_probability(make, shape):
    torch.manual_seed(0)
    base = make()
    layer = _layer(base, module_dropout=0.3)
    x = torch.randn(shape)
    with torch.no_grad():
        skipped = [torch.equal(layer(x), base(x)) for _ in range(2000)]
        layer.eval()
        assert not torch.equal(layer(x), base(x))
    assert 0.26 < sum(skipped) / len(skipped) < 0.34


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return outline_dataset(tmp_path_factory.mktemp("data"))


def test_a_run_with_both_dropouts_resumes_to_the_uninterrupted_weights_and_records_them(base, dataset, tmp_path):
    # (with kohya's caption tag dropout too: captions that vary, encoded every step)
    kw = dict(rank_dropout=0.25, module_dropout=0.25, targets="all", conv_rank=2, caption_tag_dropout=0.3,
              scale_weight_norms=0.01)
    whole = resumes_exactly(base, dataset, tmp_path, **kw)
    a = factors(whole)
    plain = factors(train_lora(base, settings(dataset, tmp_path / "plain", targets="all", conv_rank=2)))
    assert any(not torch.equal(a[k][1], plain[k][1]) for k in a)
    meta = read_metadata(whole)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_caption_tag_dropout_rate"] == "0.3"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2.0", "rank_dropout": "0.25",
                                                   "module_dropout": "0.25"}
    assert meta["ss_scale_weight_norms"] == "0.01"
    # every layer's weight change held to the norm, where the plain run's grew past it
    norms = {k: ad.delta((ad.tensors["up"].shape[0], -1)).norm().item() for k, _, ad in load_lora(whole).items()}
    assert max(norms.values()) <= 0.01 * (1 + 1e-4)
    assert max(ad.delta((ad.tensors["up"].shape[0], -1)).norm().item()
               for _, _, ad in load_lora(tmp_path / "plain" / "lora.safetensors").items()) > 0.01
    events = EventAccumulator(str(tmp_path / "whole" / logs.TENSORBOARD_DIR))
    events.Reload()
    scaled = [e.value for e in events.Scalars("max_norm/keys_scaled")]
    assert len(scaled) == 4 and scaled[-1] > 0
    assert [e.value for e in events.Scalars("max_norm/max_key_norm")][-1] == pytest.approx(0.01)
    assert "ss_network_args" not in read_metadata(tmp_path / "plain" / "lora.safetensors") or \
        "rank_dropout" not in read_metadata(tmp_path / "plain" / "lora.safetensors")["ss_network_args"]


def test_max_norm_brings_each_layer_above_the_limit_to_it_and_leaves_the_others(base, dataset, tmp_path):
    network = Network(base, settings(dataset, tmp_path / "o", targets="all"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, layer in enumerate(network.layers.values()):  # every other layer far below the limit
            layer.up.weight.copy_(torch.randn(layer.up.weight.shape, generator=g) * (1e-4 if i % 2 else 1.0))

    def deltas():
        return [(layer.up.weight.flatten(1) @ layer.down.weight.flatten(1)) * layer.scale
                for layer in network.layers.values()]

    before = [d.clone() for d in deltas()]
    stats = network.max_norm(0.5)
    after = deltas()
    over = [b.norm().item() > 0.5 for b in before]
    assert stats["max_norm/keys_scaled"] == sum(over) > 0 and stats["max_norm/max_key_norm"] == 0.5
    for b, a, was_over in zip(before, after, over):
        if was_over:  # the same direction, at the limit
            assert a.norm().item() == pytest.approx(0.5, rel=1e-4)
            assert torch.allclose(a, b * (0.5 / b.norm()), rtol=1e-4, atol=1e-7)
        else:
            assert torch.equal(a, b)


def _delta_layer(cls, base, **kw):
    layer = cls(base, 2, 2.0, 0.0, torch.Generator().manual_seed(0), **kw)
    with torch.no_grad():
        for p in layer.factors.values():  # no factor at zero: a change that is not zero
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return layer


DELTA_LAYERS = [pytest.param(LohaLayer, lambda: nn.Linear(6, 8), (3, 7, 6), id="loha-linear"),
                pytest.param(LokrLayer, lambda: nn.Linear(6, 8), (3, 6), id="lokr-linear"),
                pytest.param(LokrLayer, lambda: nn.Conv2d(6, 8, 3, padding=1), (3, 6, 4, 4), id="lokr-conv"),
                pytest.param(Ia3Layer, lambda: nn.Linear(6, 8), (3, 6), id="ia3-linear"),  # one factor: the ratio
                pytest.param(Ia3Layer, lambda: nn.Conv2d(6, 8, 3, padding=1), (3, 6, 4, 4), id="ia3-conv")]


@pytest.mark.parametrize("cls, make, shape", DELTA_LAYERS)
def test_lycoris_dropouts_act_on_the_weight_change_as_lycoris_and_are_unbiased(cls, make, shape):
    """LyCORIS's rank dropout: each output row of ΔW dropped per forward (all samples alike), the rest scaled by
    1/(1 - p); module dropout: ΔW skipped with its probability; in eval mode neither."""
    torch.manual_seed(0)
    base = make()
    plain = _delta_layer(cls, base)
    rows, skips = _delta_layer(cls, base, rank_dropout=0.5), _delta_layer(cls, base, module_dropout=0.3)
    x = torch.randn(shape)
    with torch.no_grad():
        full = plain(x) - base(x)
        for layer in (rows, skips):
            layer.eval()
            assert torch.allclose(layer(x), plain(x), atol=1e-6)
            layer.train()
        draws = torch.stack([rows(x) - base(x) for _ in range(4000)])
        skipped = [torch.equal(skips(x), base(x)) for _ in range(2000)]
    # one draw per forward: each output row kept (x 2) or dropped (x 0), for every sample and position alike
    channel = 1 if isinstance(base, nn.Conv2d) else full.dim() - 1
    others = [d for d in range(full.dim()) if d != channel]
    per_row = (draws * full).sum([d + 1 for d in others]) / (full * full).sum(others)  # [draws, rows]
    assert set(per_row.round(decimals=3).unique().tolist()) == {0.0, 2.0}
    shape = [len(draws)] + [full.shape[d] if d == channel else 1 for d in range(full.dim())]
    assert torch.allclose(draws, full * per_row.view(shape), atol=1e-5 * full.abs().max().item())
    assert torch.allclose(draws.mean(0), full, atol=0.06 * full.abs().max().item())
    assert 0.26 < sum(skipped) / len(skipped) < 0.34


@pytest.mark.parametrize("cls, make, shape", DELTA_LAYERS)
def test_lycoris_max_norm_brings_the_change_to_the_limit_in_the_same_direction(cls, make, shape):
    layer = _delta_layer(cls, make())
    with torch.no_grad():
        before = layer.delta().clone()
        limit = before.norm().item() / 3
        assert layer.limit_norm(limit).item() == pytest.approx(before.norm().item(), rel=1e-5)
        after = layer.delta()
        assert after.norm().item() == pytest.approx(limit, rel=1e-4)
        assert torch.allclose(after, before / 3, rtol=1e-4, atol=1e-6)
        kept = {k: p.clone() for k, p in layer.factors.items()}
        layer.limit_norm(limit * 2)  # within the limit: every factor multiplied by exactly 1
        assert all(torch.equal(kept[k], p) for k, p in layer.factors.items())


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_a_lycoris_run_with_the_dropouts_and_max_norm_resumes_exactly_and_records_them(base, dataset, tmp_path, algo):
    kw = dict(algo=algo, rank_dropout=0.25, module_dropout=0.25, scale_weight_norms=0.05, lr=1e-2)
    whole = load_lora(resumes_exactly(base, dataset, tmp_path, **kw))
    plain = load_lora(train_lora(base, settings(dataset, tmp_path / "plain", algo=algo, lr=1e-2)))
    meta = whole.metadata
    args = json.loads(meta["ss_network_args"])
    assert meta["ss_network_module"] == "lycoris.kohya" and args["algo"] == algo
    assert {k: args[k] for k in ("rank_dropout", "module_dropout", "rank_dropout_scale")} == {
        "rank_dropout": "0.25", "module_dropout": "0.25", "rank_dropout_scale": "True"}
    assert meta["ss_scale_weight_norms"] == "0.05"

    def largest(lora):
        return max(ad.delta((ad.io().out, -1)).norm().item() for _, _, ad in lora.items())

    assert largest(whole) <= 0.05 * (1 + 1e-4) < largest(plain)


def test_loraplus_moves_the_up_factors_ratio_times_as_far(base, dataset, tmp_path):
    """LoRA+: from up = 0, AdamW's first step is lr · g/(|g| + eps) per element, so a run at ratio 16 has up
    factors 16 times the plain run's; the down factors, whose gradient is 0 at that step, are the plain run's."""
    plus = train_lora(base, settings(dataset, tmp_path / "plus", steps=1, save_every=0, loraplus_lr_ratio=16.0))
    plain = factors(train_lora(base, settings(dataset, tmp_path / "plain", steps=1, save_every=0)))
    for k, (down, up) in factors(plus).items():
        assert torch.equal(down, plain[k][0]) and up.abs().max() > 0
        assert torch.allclose(up, 16 * plain[k][1], rtol=1e-5, atol=0)
    assert json.loads(read_metadata(plus)["ss_network_args"]) == {"loraplus_lr_ratio": "16.0"}
    network = Network(base, settings(dataset, tmp_path / "o", text_encoder=True))
    lrs = {"unet": 1e-4, "text_encoder": 5e-5}
    groups = {g["name"]: g["lr"] for g in network.param_groups(lrs, {"unet": 16.0, "text_encoder": 16.0})}
    assert groups == {"unet": 1e-4, "unet up": 16e-4, "text_encoder": 5e-5, "text_encoder up": 16 * 5e-5}
    # kohya's per-component ratios: the UNet's or the text encoders' own where given, else the common one
    for given, want in (({"loraplus_unet_lr_ratio": 8.0}, {"unet": 8.0, "text_encoder": 0.0}),
                        ({"loraplus_lr_ratio": 16.0, "loraplus_te_lr_ratio": 4.0}, {"unet": 16.0, "text_encoder": 4.0})):
        assert lora_train.loraplus_ratios(settings(dataset, tmp_path / "o", **given), lrs) == want
    groups = {g["name"]: g["lr"] for g in network.param_groups(lrs, {"unet": 8.0, "text_encoder": 0.0})}
    assert groups == {"unet": 1e-4, "unet up": 8e-4, "text_encoder": 5e-5}
    split = train_lora(base, settings(dataset, tmp_path / "split", steps=1, save_every=0, loraplus_unet_lr_ratio=16.0,
                                      loraplus_te_lr_ratio=4.0))
    assert json.loads(read_metadata(split)["ss_network_args"]) == {"loraplus_unet_lr_ratio": "16.0",
                                                                   "loraplus_text_encoder_lr_ratio": "4.0"}
    with pytest.raises(SdtuneError, match=r"--algo loha --loraplus-lr-ratio: LoRA\+ speeds up a LoRA's up factor; "
                                          r"loha has none \(use --algo lora or dora\)"):
        settings(dataset, tmp_path / "o", algo="loha", loraplus_lr_ratio=16.0).check()


def test_dora_and_bad_values_are_refused(dataset, tmp_path):
    with pytest.raises(SdtuneError, match=r"--algo dora --scale-weight-norms: sdtune offers it with --algo lora, "
                                          r"loha, lokr, ia3, full \(DoRA's layer computes with the whole weight"):
        settings(dataset, tmp_path / "o", algo="dora", rank_dropout=0.1, scale_weight_norms=1.0).check()
    settings(dataset, tmp_path / "o", algo="dora", rank_dropout=0.1, module_dropout=0.1).check()  # (LyCORIS's)
    with pytest.raises(SdtuneError, match=r"--scale-weight-norms -1.0: must be 0 \(off\) or more"):
        settings(dataset, tmp_path / "o", scale_weight_norms=-1.0).check()
    with pytest.raises(SdtuneError, match=r"--module-dropout 1.0: must be in \[0, 1\)"):
        settings(dataset, tmp_path / "o", module_dropout=1.0).check()


TWO_PROCESSES = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from sdtune.models import load_base
    from sdtune.train.config import LoraSettings
    from sdtune.train.lora import train_lora
    data, out = sys.argv[1:3]
    train_lora(load_base("tiny-random"), LoraSettings(data=data, out=out, steps=3, batch_size=2, rank=4, alpha=4,
                                                       lr=1e-3, progress=False, module_dropout=0.5))
""")


def test_module_dropout_trains_on_two_processes(dataset, tmp_path):
    """Each process skips its own layers; DDP is told to find the gradients a step left out."""
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESSES)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(dataset), str(tmp_path / "two")], env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    ups = [ad.tensors["up"] for _, _, ad in load_lora(tmp_path / "two" / "lora.safetensors").items()]
    assert any(u.abs().max() > 0 for u in ups)


def test_rs_lora_scales_by_the_root_of_the_rank_and_saves_it_as_every_loader_reads_alpha(base, dataset, tmp_path):
    """alpha/sqrt(rank): rank 4 at alpha 2 trains what alpha 4 trains without it (both scale 1), and the file's
    alpha is 4 (alpha x sqrt(rank)), which A1111, ComfyUI and diffusers divide by the rank as for any LoRA."""
    rs = train_lora(base, settings(dataset, tmp_path / "rs", rank=4, alpha=2, rs_lora=True, save_every=0, steps=2))
    plain = train_lora(base, settings(dataset, tmp_path / "plain", rank=4, alpha=4, save_every=0, steps=2))
    a, b = factors(rs), factors(plain)
    assert a.keys() == b.keys() and all(torch.equal(x, y) for k in a for x, y in zip(a[k], b[k]))
    assert {ad.alpha for _, _, ad in load_lora(rs).items()} == {4.0}
    meta = read_metadata(rs)
    assert json.loads(meta["ss_network_args"]) == {"rs_lora": "True"} and meta["ss_network_alpha"] == "4.0"  # (as its keys)
