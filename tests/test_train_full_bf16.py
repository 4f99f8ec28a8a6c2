"""--full-bf16 (kohya's --full_bf16): the trained tensors, their gradients and the optimizer's state in bf16 under
bf16 mixed precision; the run learns what the fp32-weights run learns, to bf16's rounding, resumes bit for bit, and
is refused in one line without bf16 mixed precision."""

import pytest
import torch
from small_runs import outline_dataset, resumes_exactly, settings

from sdtune.cli import main
from sdtune.lora.formats import load_lora
from sdtune.ti.formats import load_embedding
from sdtune.train.config import TISettings
from sdtune.train.lora import train_lora
from sdtune.train.ti import train_ti


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return outline_dataset(tmp_path_factory.mktemp("data"))


def _trained(base) -> list[torch.nn.Parameter]:
    return [p for model in (base.unet, base.text_encoder) for p in model.parameters() if p.requires_grad]


def test_lora_trains_in_bf16_and_learns_what_fp32_weights_learn(base, dataset, tmp_path):
    seen = {}

    def look(step, loss):  # after a step: the weights and the optimizer's moments in bf16
        if step == 2:
            seen["weights"] = {p.dtype for p in _trained(base)}

    kw = dict(mixed_precision="bf16", steps=4, targets="all", conv_rank=2, text_encoder=True)
    small = load_lora(train_lora(base, settings(dataset, tmp_path / "bf16", full_bf16=True, **kw), callback=look))
    assert seen == {"weights": {torch.bfloat16}}
    state = torch.load(tmp_path / "bf16" / "resume.pt", weights_only=True)
    assert {t.dtype for t in state["trainable"].values()} == {torch.bfloat16}
    moments = [t for s in state["optimizer"]["state"].values() for k, t in s.items() if k.startswith("exp_avg")]
    assert moments and {t.dtype for t in moments} == {torch.bfloat16}
    wide = load_lora(train_lora(base, settings(dataset, tmp_path / "fp32", **kw)))
    worst, changed = 0.0, False
    for comp, path, ad in wide.items():
        shape = (ad.tensors["up"].shape[0], -1)
        da, db = ad.delta(shape), small.modules[comp][path].delta(shape)
        worst = max(worst, ((da - db).norm() / da.norm()).item())
        changed |= not torch.equal(da, db)
    # bf16 keeps 8 bits of each factor: a few steps' ΔW agree to a few percent, and do differ
    assert changed and worst < 0.1, worst
    assert all(p.dtype == torch.float32 for p in base.unet.parameters())  # (the base's own, untouched)


def test_a_full_bf16_run_resumes_bit_for_bit(base, dataset, tmp_path):
    resumes_exactly(base, dataset, tmp_path, steps=5, mixed_precision="bf16", full_bf16=True)


def test_textual_inversion_trains_its_rows_in_bf16(base, dataset, tmp_path):
    seen = {}

    def look(step, loss):
        if step == 1:
            seen["rows"] = {p.dtype for p in _trained(base)}

    out = train_ti(base, TISettings(data=str(dataset), out=str(tmp_path / "ti"), token="<bf>", init_token="star",
                                    steps=2, batch_size=2, report=False, progress=False, mixed_precision="bf16",
                                    full_bf16=True), callback=look)
    assert seen == {"rows": {torch.bfloat16}}
    vectors = load_embedding(out).vectors
    assert vectors.dtype == torch.float32 and torch.isfinite(vectors).all()
    assert torch.equal(vectors, vectors.bfloat16().float())  # (trained in bf16: its values are bf16's)


def test_full_bf16_without_bf16_mixed_precision_is_one_line(dataset, tmp_path, capsys):
    assert main(["train", "lora", "--model", "tiny-random", "--data", str(dataset), "--out", str(tmp_path / "o"),
                 "--full-bf16", "--steps", "1"]) != 0
    err = capsys.readouterr().err.strip()
    assert err == ("sdtune: error: --full-bf16: the trained weights in bf16 compute under bf16 mixed precision, and "
                   "this run's is no; add --mixed-precision bf16")


def test_runs_of_other_precisions_follow_each_other_in_one_process(base, dataset, tmp_path):
    """accelerate fixes its state at a process's first Accelerator: each run starts it afresh (CI once failed here
    when a bf16 run followed fp32 ones)."""
    for i, precision in enumerate(("no", "bf16", "no")):
        out = train_lora(base, settings(dataset, tmp_path / str(i), steps=1, mixed_precision=precision))
        assert load_lora(out).metadata["ss_mixed_precision"] == precision
