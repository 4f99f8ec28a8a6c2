"""kohya's options for a LoRA's factors: rank and module dropout (what a layer computes with them, in training mode
only, unbiased) and max-norm regularisation (--scale-weight-norms); a run with all of them (and kohya's caption tag
dropout) resumes to the uninterrupted weights and records them as kohya does; module dropout runs on two
processes; what they cannot take is one line."""

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

from sdtune.lora.algos.lora import LoraLayer
from sdtune.lora.formats import load_lora
from sdtune.safeio import SdtuneError, read_metadata
from sdtune.train import logs
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


def test_other_algorithms_and_bad_values_are_refused(dataset, tmp_path):
    with pytest.raises(SdtuneError, match=r"--algo loha --rank-dropout: kohya's options for a LoRA's factors; "
                                          r"sdtune offers them with --algo lora only"):
        settings(dataset, tmp_path / "o", algo="loha", rank_dropout=0.1).check()
    with pytest.raises(SdtuneError, match=r"--algo dora --scale-weight-norms"):
        settings(dataset, tmp_path / "o", algo="dora", scale_weight_norms=1.0).check()
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
