"""--init-embedding (kohya's --weights; A1111 trains on an embedding it made): the new word starts from an embedding
file's vectors, in each text encoder (SDXL's clip_l and clip_g), whatever its layout; a file of another size or
family is one line before the images are encoded."""

import pytest
import torch
from small_runs import outline_dataset

from sdtune.cli import main
from sdtune.models import load_base
from sdtune.ti.formats import Embedding, load_embedding, save_embedding
from sdtune.train.config import load_settings


def vectors(spec: str, n: int, seed: int) -> dict[str, torch.Tensor]:
    """``n`` random vectors per text encoder of ``spec``, by embedding key, far from any word's."""
    base = load_base(spec, device="cpu", dtype="fp32")
    g = torch.Generator().manual_seed(seed)
    return {te.embedding_key: torch.randn(n, model.get_input_embeddings().weight.shape[1], generator=g) * 3
            for te, model, _ in base.text_encoders()}


@pytest.mark.parametrize("spec, layout", [("tiny-random", "a1111"), ("tiny-xl-random", "diffusers")])
def test_the_new_word_starts_from_the_files_vectors(tmp_path, capsys, recwarn, spec, layout):
    start = vectors(spec, 2, seed=5)
    file = tmp_path / ("start.pt" if layout == "a1111" else "start.safetensors")
    save_embedding(Embedding.from_parts("<old>", start, "made here", layout), file, format=layout)
    out = tmp_path / "run"
    assert main(["train", "ti", "--model", spec, "--data", str(outline_dataset(tmp_path / "data")), "--out", str(out),
                 "--token", "<new>", "--init-embedding", str(file), "--num-vectors", "2", "--steps", "1",
                 "--lr", "1e-9", "--no-report", "--no-progress", "--sample-every", "0", "--init-token", "star"]) == 0
    capsys.readouterr()
    said = f"--init-token 'star' is not used: the vectors start from --init-embedding {file}"
    assert said in {str(w.message) for w in recwarn}  # (kohya's configs give init_word beside weights)
    learned = load_embedding(out / "learned_embeds.safetensors")
    assert learned.token == "<new>" and learned.parts.keys() == start.keys()
    for key, rows in start.items():  # one step at lr 1e-9: the file's vectors, moved by about 1e-9
        torch.testing.assert_close(learned.parts[key], rows, rtol=0, atol=1e-6)


def test_a_file_that_does_not_fit_is_one_line_before_the_images_are_encoded(tmp_path, capsys):
    data = outline_dataset(tmp_path / "data")
    two = tmp_path / "two.safetensors"
    save_embedding(Embedding.from_parts("<two>", vectors("tiny-random", 2, seed=1), "here", "diffusers"), two)
    xl = tmp_path / "xl.safetensors"
    save_embedding(Embedding.from_parts("<xl>", vectors("tiny-xl-random", 1, seed=1), "here", "diffusers"), xl)
    common = ["train", "ti", "--model", "tiny-random", "--data", str(data), "--token", "<new>", "--no-progress"]
    for extra, says in (
            (["--init-embedding", str(two)],
             f"--init-embedding {two}: has 2 vector(s) and --num-vectors is 1; give --num-vectors 2"),
            (["--init-embedding", str(xl)], f"{xl}: embedding made for"),
            (["--init-embedding", str(tmp_path / "none.pt")], "--init-embedding"),
            ([], "no init token; pass --init-token WORD (an existing word close to the concept), or "
                 "--init-embedding FILE")):
        assert main([*common, "--out", str(tmp_path / "o"), *extra]) != 0
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "o" / "resume.pt").exists()


def test_a_kohya_textual_inversion_configs_weights_are_the_starting_embedding(tmp_path):
    cfg = tmp_path / "ti.toml"
    cfg.write_text('pretrained_model_name_or_path = "m"\ntoken_string = "<w>"\ninit_word = "cat"\n'
                   'weights = "/emb/start.safetensors"\nnum_vectors_per_token = 4\n')
    s = load_settings(cfg, {}, "ti", family="sd1")
    assert (s.token, s.init_token, s.init_embedding, s.num_vectors) == ("<w>", "cat", "/emb/start.safetensors", 4)
