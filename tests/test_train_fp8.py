"""--fp8-base: the UNet's frozen layers stored in fp8 while a run trains, each computing in its own dtype; the run
trains what a UNet rounded to fp8 trains (bit for bit), the LoRA's factors stay fp32, and the base comes back as it
was."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from small_runs import factors, outline_dataset, settings
from torch import nn

from sdtune.cli import main
from sdtune.console import SdtuneWarning
from sdtune.lora.formats import load_lora
from sdtune.safeio import SdtuneError
from sdtune.ti.formats import load_embedding
from sdtune.train import fp8
from sdtune.train.config import TISettings
from sdtune.train.lora import train_lora
from sdtune.train.ti import train_ti


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return outline_dataset(tmp_path_factory.mktemp("data"))


def _rounded(base, text: bool = True):
    """A copy of ``base`` whose UNet linear and convolution layers (and, with ``text``, its text encoder's linear
    layers) hold their fp8-rounded weights, in fp32."""
    other = copy.deepcopy(base)
    models = [m for name, m in other.modules().items() if name == "unet" or (text and name.startswith("text_"))]
    with torch.no_grad():
        for m in (layer for model in models for layer in model.modules()):
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.copy_(m.weight.to(fp8.FP8).float())
    return other


def _weights(base) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.clone() for name, model in base.modules().items() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("algo,switch,text_encoder", [("lora", "fp8_base", True), ("loha", "fp8_base", False),
                                                      ("lora", "fp8_base_unet", True)])
def test_a_run_on_fp8_layers_trains_what_the_rounded_base_trains(base, dataset, tmp_path, algo, switch,
                                                                  text_encoder):
    """--fp8-base: the UNet and the text encoder (trained with --text-encoder or not); --fp8-base-unet: the UNet."""
    before = _weights(base)
    seen = {}

    def look(step, loss):  # while it trains: the frozen layers are 8-bit, the LoRA's factors are not
        if step == 1:
            for name, model in base.modules().items():
                seen[name] = {m.weight.dtype for m in model.modules() if isinstance(m, fp8.Fp8Layer)}
                seen[f"{name} left"] = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                                        and not m.weight.requires_grad]
            seen["trained"] = {p.dtype for m in (base.unet, base.text_encoder) for p in m.parameters()
                               if p.requires_grad}
            seen["unet dtype"] = base.unet.dtype

    kw = dict(algo=algo, targets="all", conv_rank=2, save_every=0, steps=2, text_encoder=text_encoder)
    flag = "--" + switch.replace("_", "-")
    with pytest.warns(SdtuneWarning, match=f"^{flag}: saves a GPU's memory; on the CPU"):
        small = train_lora(base, settings(dataset, tmp_path / "fp8", **{switch: True}, **kw), callback=look)
    whole = switch == "fp8_base"
    assert seen == {"unet": {fp8.FP8}, "unet left": [], "text_encoder": {fp8.FP8} if whole else set(),
                    "text_encoder left": [] if whole else seen["text_encoder left"], "vae": set(),
                    "vae left": seen["vae left"], "trained": {torch.float32}, "unet dtype": torch.float32}
    assert whole or seen["text_encoder left"]  # (--fp8-base-unet: the text encoder's layers as they were)
    rounded = train_lora(_rounded(base, text=whole), settings(dataset, tmp_path / "rounded", **kw))
    a, b = factors(small), factors(rounded)
    assert a.keys() == b.keys() and all(torch.equal(x, y) for k in a for x, y in zip(a[k], b[k]))
    assert any(k.startswith("text_encoder") for k in a) == text_encoder
    plain = factors(train_lora(base, settings(dataset, tmp_path / "plain", **kw)))
    assert any(not torch.equal(x, y) for k in a for x, y in zip(a[k], plain[k]))  # (the rounding is seen)
    # the base as it was: its own layers, weights and dtypes, no casting hooks
    after = _weights(base)
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) and after[k].dtype == v.dtype
                                                 for k, v in before.items())
    assert not any(isinstance(m, fp8.Fp8Layer) for model in base.modules().values() for m in model.modules())


def test_textual_inversion_on_fp8_layers_trains_what_the_rounded_base_trains(base, dataset, tmp_path):
    """The text encoder the embedding trains through is in fp8 too (its token embeddings are not: no linear
    layer)."""
    def run(model, out, **kw):  # (a word of its own each: a run leaves its word in the model)
        return train_ti(model, TISettings(data=str(dataset), out=str(tmp_path / out), token=f"<{out}-word>",
                                          init_token="star", steps=2, batch_size=2, report=False, progress=False, **kw))

    with pytest.warns(SdtuneWarning, match="--fp8-base"):
        small = load_embedding(run(base, "fp8", fp8_base=True)).vectors
    assert torch.equal(small, load_embedding(run(_rounded(base), "rounded")).vectors)
    with pytest.warns(SdtuneWarning, match="--fp8-base-unet"):
        unet_only = load_embedding(run(base, "unet", fp8_base_unet=True)).vectors
    assert torch.equal(unet_only, load_embedding(run(_rounded(base, text=False), "unetrounded")).vectors)
    assert not torch.equal(small, unet_only)
    assert not torch.equal(small, load_embedding(run(base, "plain")).vectors)


def test_a_weight_past_fp8s_range_is_refused_and_the_layers_are_put_back():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        model[1].weight[0, 0] = 1000.0
    first = model[0]
    with pytest.raises(SdtuneError, match=r"^--fp8-base: the UNet's 1 layer holds weights past fp8's largest value "
                                          r"\(448\); train without --fp8-base$"):
        fp8.store_in_fp8(model, set())
    assert model[0] is first and model[0].weight.dtype == torch.float32


def test_two_processes_on_fp8_layers_equal_one_with_double_batch(dataset, tmp_path):
    """DDP leaves the 8-bit weights alone (every process loaded the same; its broadcast takes no fp8)."""
    common = ["--model", "tiny-random", "--data", str(dataset), "--steps", "2", "--rank", "4", "--alpha", "4",
              "--lr", "1e-3", "--fp8-base", "--validation-split", "0", "--no-report", "--no-progress",
              "--sample-every", "0"]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "sdtune", "train", "lora", *common, "--batch-size", "2", "--out", str(tmp_path / "two")],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
                         check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    with pytest.warns(SdtuneWarning, match="--fp8-base"):
        assert main(["train", "lora", *common, "--batch-size", "4", "--out", str(tmp_path / "one")]) == 0
    a, b = (load_lora(tmp_path / run / "lora.safetensors") for run in ("one", "two"))
    for comp, path, ad in a.items():
        shape = (ad.tensors["up"].shape[0], -1)
        da, db = ad.delta(shape), b.modules[comp][path].delta(shape)
        assert ((da - db).norm() / da.norm()).item() < 1e-3, path
