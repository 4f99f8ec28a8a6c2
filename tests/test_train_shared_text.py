"""A batch's repeated captions go through the cross-attention's text projections once (``train.shared_text``):
the same outputs and gradients as projecting every sample's copy, and the same training run."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image
from safetensors.torch import load_file

from sdtune.models import load_base
from sdtune.train import shared_text
from sdtune.train.config import LoraSettings
from sdtune.train.logs import CSV_FILE, read_csv
from sdtune.train.lora import train_lora


def test_distinct_rows():
    assert shared_text.distinct_rows(["a", "b"]) == (["a", "b"], None)
    distinct, rows = shared_text.distinct_rows(["b", "a", "b", "b"])
    assert distinct == ["b", "a"] and rows.tolist() == [0, 1, 0, 0]


@pytest.mark.parametrize("model", ["tiny-random", "tiny-xl-random"])
def test_shared_projection_gives_the_same_outputs_and_gradients(model):
    base = load_base(model, device="cpu", dtype="fp32")
    unet, cfg = base.unet, base.unet.config
    g = torch.Generator().manual_seed(0)
    distinct = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    rows = torch.tensor([0, 1, 0, 0])
    latents = torch.randn(4, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    timesteps = torch.tensor([10, 300, 600, 999])
    extra = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(4, pooled, generator=g),
                                      "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]).expand(4, 6)}
    # what a LoRA on the cross-attention trains sits after these projections: their weights' gradients are
    # the sums over samples that the gather's backward forms
    weights = [w for n, m in unet.named_modules() if n.endswith("attn2") for w in (m.to_k.weight, m.to_v.weight)]
    unet.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)

    def run(shared: bool):
        for w in weights:
            w.grad = None
        if shared:
            undo = shared_text.install(unet)
            out = unet(latents, timesteps, distinct, cross_attention_kwargs={"text_rows": rows}, **extra).sample
            undo()
        else:
            out = unet(latents, timesteps, distinct[rows], **extra).sample
        out.square().mean().backward()
        return out.detach(), [w.grad.clone() for w in weights]

    try:
        plain, plain_grads = run(False)
        shared, shared_grads = run(True)
    finally:
        unet.requires_grad_(False)
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())  # the undo put them back
    # the same products, summed in another order: rounding differences only
    assert torch.allclose(shared, plain, rtol=0, atol=1e-5 * plain.abs().max().item())
    for a, b in zip(shared_grads, plain_grads):
        assert b.abs().max() > 0 and torch.allclose(a, b, rtol=0, atol=1e-4 * b.abs().max().item())


def test_one_caption_run_equals_the_run_without_sharing(tmp_path, monkeypatch):
    """DreamBooth-style: one caption for every image. The shared run computes what the unshared one does."""
    data = tmp_path / "data"
    data.mkdir()
    for i, colour in enumerate(["red", "blue", "green", "orange", "purple", "cyan"]):
        img = Image.new("RGB", (64, 64), "white")
        img.paste(Image.new("RGB", (24, 24), colour), (8 + 4 * i, 16))
        img.save(data / f"{i}.png")
    base = load_base("tiny-xl", device="cpu", dtype="fp32")
    calls = []
    real = shared_text.SharedTextProcessor.__call__

    def counting(self, attn, hidden_states, encoder_hidden_states=None, *a, text_rows=None, **k):
        if encoder_hidden_states is not None:
            calls.append((len(encoder_hidden_states), None if text_rows is None else text_rows.tolist()))
        return real(self, attn, hidden_states, encoder_hidden_states, *a, text_rows=text_rows, **k)

    def train(out, **kw):
        s = LoraSettings(data=str(data), out=str(out), default_caption="a sks square", steps=4, batch_size=4,
                         rank=4, alpha=4, lr=1e-3, targets="attn", validation_split=0.0, sample_every=0,
                         save_every=0, report=False, progress=False, buckets=False, **kw)
        train_lora(base, s)
        return load_file(out / "lora.safetensors"), read_csv(out / CSV_FILE)

    monkeypatch.setattr(shared_text.SharedTextProcessor, "__call__", counting)
    shared, shared_log = train(tmp_path / "shared")
    # every cross-attention call got one text row: the training batches of 4 and the validation's batches
    assert calls and all(n == 1 and rows and set(rows) == {0} for n, rows in calls)
    assert {len(rows) for _, rows in calls} >= {4}
    calls.clear()
    plain, plain_log = train(tmp_path / "plain", share_text=False)  # the setting that turns sharing off
    assert not calls
    assert all(type(p) is AttnProcessor2_0 for p in base.unet.attn_processors.values())
    assert shared.keys() == plain.keys() and shared_log.keys() == plain_log.keys()
    for step, row in plain_log.items():
        for k, v in row.items():
            if isinstance(v, float) and k.endswith("loss"):
                assert shared_log[step][k] == pytest.approx(v, rel=1e-4, abs=1e-7), (step, k)
    moved = 0
    for k, t in plain.items():
        assert torch.allclose(shared[k], t, rtol=0, atol=1e-3 * t.abs().max().item() + 1e-12), k
        moved += int(t.abs().max() > 0)
    assert moved > len(plain) // 3  # the LoRA did train
