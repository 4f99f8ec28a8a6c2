"""kohya sd-scripts' dataset config (--dataset_config) as --data: its subsets are image folders with their repeats and
class_tokens, read as N_name folders are (the same images, captions and repeats train the same weights); its options
are settings under the --config file's and the flags; is_reg subsets are the class images; what sdtune cannot read
is one line naming the file."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from small_runs import outline_dataset

from sdtune.cli import main
from sdtune.safeio import SdtuneError, read_metadata
from sdtune.train import loop
from sdtune.train.captions import caption_options
from sdtune.train.config import load_settings
from sdtune.train.data import TrainingSet, encode, seed_for
from sdtune.train.images import fit, to_tensor
from sdtune.train.scan import fingerprint, scan_data, split_validation


def images(folder, n, caption=None, colour=(200, 40, 40)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (64, 64), (colour[0], colour[1] + 20 * i, colour[2])).save(folder / f"{i}.png")
        if caption is not None:
            (folder / f"{i}.txt").write_text(f"{caption} {i}")
    return folder


def dataset_file(path, body):
    path.write_text(body)
    return path


def test_subsets_scan_as_folders_with_their_repeats_and_class_tokens(tmp_path, monkeypatch):
    cats = images(tmp_path / "cats", 2)  # no caption files: class_tokens is the caption
    images(tmp_path / "more" / "dogs", 3, caption="a dog")
    images(tmp_path / "other" / "cats", 1, caption="a second cat")  # a folder named as the first
    images(tmp_path / "reg", 2)
    monkeypatch.chdir(tmp_path / "more")  # relative folders: from the current folder (as sd-scripts), else the file's
    ds = dataset_file(tmp_path / "ds.toml", f"""
[[datasets]]
  [[datasets.subsets]]
  image_dir = "{cats}"
  num_repeats = 10
  class_tokens = "sks cat"
  [[datasets.subsets]]
  image_dir = "dogs"
  caption_extension = ".caption"  # a subset's own extension: sdtune reads both
  [[datasets.subsets]]
  image_dir = "other/cats"
  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true
  class_tokens = "cat"
""")
    scan = scan_data(ds)
    got = [(ex.path.relative_to(tmp_path).as_posix(), ex.caption, ex.repeats, ex.name, ex.group) for ex in scan.examples]
    assert got == [("cats/0.png", "sks cat", 10, "cats/0.png", "cats"), ("cats/1.png", "sks cat", 10, "cats/1.png", "cats"),
                   ("more/dogs/0.png", "a dog 0", 1, "dogs/0.png", "dogs"),
                   ("more/dogs/1.png", "a dog 1", 1, "dogs/1.png", "dogs"),
                   ("more/dogs/2.png", "a dog 2", 1, "dogs/2.png", "dogs"),
                   ("other/cats/0.png", "a second cat 0", 1, "cats-2/0.png", "cats-2")]
    assert scan.folders == {"cats": {"n_repeats": 10, "img_count": 2}, "dogs": {"n_repeats": 1, "img_count": 3},
                            "cats-2": {"n_repeats": 1, "img_count": 1}}
    reg = scan_data(ds, reg=True)
    assert [(ex.path.name, ex.caption, ex.group) for ex in reg.examples] == [("0.png", "cat", "reg"),
                                                                              ("1.png", "cat", "reg")]
    # the held-out images and the resume fingerprint go by the names, not by where the folders are
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path, moved, ignore=shutil.ignore_patterns("moved"))
    monkeypatch.chdir(moved / "more")
    other = scan_data(dataset_file(moved / "ds.toml", ds.read_text().replace(str(cats), str(moved / "cats"))))
    assert fingerprint(other, moved / "ds.toml") == fingerprint(scan, ds)
    assert [ex.name for ex in split_validation(other, 0.4, moved)[1].examples] == \
        [ex.name for ex in split_validation(scan, 0.4, tmp_path)[1].examples]


def test_options_are_settings_under_the_config_and_the_flags(tmp_path, recwarn):
    data = images(tmp_path / "img", 2, caption="a")
    ds = dataset_file(tmp_path / "ds.toml", f"""
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".txt"
cache_info = true
[[datasets]]
resolution = [768, 768]
batch_size = 2
enable_bucket = true
keep_tokens = 2
  [[datasets.subsets]]
  image_dir = "{data}"
  flip_aug = true
  [[datasets.subsets]]
  image_dir = "{data}"
  is_reg = true
  keep_tokens = 0
  enable_wildcard = true
""")
    s = load_settings(ds, {"out": str(tmp_path / "out")}, "lora", family="sd1")  # the dataset config as --config
    assert (s.data, s.reg_dir, s.shuffle_captions, s.keep_tokens, s.resolution, s.batch_size, s.buckets, s.crop) == \
        (str(ds.resolve()), str(ds.resolve()), True, 0, 768, 2, True, "center")
    said = {str(w.message) for w in recwarn}
    assert f"{ds}: the class images of {data.resolve()} train with the training images' options, not their own " \
           f"enable_wildcard" in said
    assert f"{ds}: cache_info changes nothing sdtune trains and is not used" in said
    # keep_tokens and flip_aug differ between the subsets: each image's own (the class images' too)
    assert [ex.options for ex in scan_data(ds).examples] == [{"keep_tokens": 2, "flip": True}] * 2
    # (the class images give no flip_aug: the run's, as sd-scripts falls back to its command line)
    assert [ex.options for ex in scan_data(ds, reg=True).examples] == [{"keep_tokens": 0}] * 2
    # --data names it: the same; a flag is over it, but not over an option each subset gives its own of
    s = load_settings(None, {"data": str(ds), "shuffle_captions": False}, "lora", family="sd1")
    assert (s.shuffle_captions, s.batch_size) == (False, 2)
    with pytest.raises(SdtuneError, match=rf"^--keep-tokens 3: {ds} gives each of its subsets its own keep_tokens, "
                                          rf"so this would change nothing; leave --keep-tokens out, or give "
                                          rf"keep_tokens once in the file's \[general\]$"):
        load_settings(None, {"data": str(ds), "keep_tokens": 3}, "lora", family="sd1")
    # in sd-scripts' training config, dataset_config's folders and options replace the config's own
    cfg = dataset_file(tmp_path / "config_lora.toml",
                       'pretrained_model_name_or_path = "tiny-random"\ntrain_data_dir = "/elsewhere"\n'
                       'dataset_config = "ds.toml"\nkeep_tokens = 5\ntrain_batch_size = 8\nlearning_rate = 1e-3\nseed = 7\n')
    s = load_settings(cfg, {}, "lora", family="sd1")
    # (its keep_tokens = 5 too: the subsets give their own)
    assert (s.data, s.keep_tokens, s.batch_size, s.lr, s.seed) == (str(ds.resolve()), 0, 2, 1e-3, 7)
    assert any("train_data_dir (dataset_config's folders are used)" in str(w.message) for w in recwarn)



def test_a_training_configs_option_is_taken_by_the_subsets_that_give_none(tmp_path, base):
    """sd-scripts reads a subset's option from the subset, its dataset, [general], then its command line (a training
    config's keys): a training config's flip_aug and shuffle_caption go to the subset that gives none."""
    own, bare = images(tmp_path / "own", 1, caption="a, b, c"), images(tmp_path / "bare", 1, caption="d, e, f")
    dataset_file(tmp_path / "ds.toml", f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{own}'\nflip_aug = false\n"
                                       f"shuffle_caption = false\nkeep_tokens = 1\n"
                                       f"[[datasets.subsets]]\nimage_dir = '{bare}'\nkeep_tokens = 2\n")
    cfg = dataset_file(tmp_path / "config_lora.toml",
                       'pretrained_model_name_or_path = "tiny-random"\ndataset_config = "ds.toml"\nflip_aug = true\n'
                       'shuffle_caption = true\nkeep_tokens = 5\n')
    s = load_settings(cfg, {}, "lora", family="sd1")
    assert (s.flip, s.shuffle_captions, s.keep_tokens) == (True, True, 0)  # (keep_tokens: every subset its own)
    scan = scan_data(s.data)
    assert [ex.options for ex in scan.examples] == [{"flip": False, "shuffle_captions": False, "keep_tokens": 1},
                                                     {"keep_tokens": 2}]
    ts = TrainingSet(scan, base.vae, 64, seed=0, flip=s.flip, captions=caption_options(s))
    assert ts.flips == [False, True]
    assert [(o["shuffle"], o["keep_tokens"]) for o in ts.example_opts] == [(False, 1), (True, 2)]


def test_a_run_on_subsets_with_their_own_options_reruns_from_its_settings(tmp_path):
    """A run's settings.toml holds every setting, those the subsets give their own of too (the run's, unused where
    every subset gives its own): --config settings.toml reruns it, bit for bit."""
    a, b = images(tmp_path / "a", 2, caption="x, y, z"), images(tmp_path / "b", 2, caption="u, v, w")
    ds = dataset_file(tmp_path / "ds.toml", f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{a}'\nkeep_tokens = 1\n"
                                            f"flip_aug = true\n[[datasets.subsets]]\nimage_dir = '{b}'\nkeep_tokens = 2\n")
    common = ["--steps", "2", "--no-report", "--no-progress", "--sample-every", "0"]
    assert main(["train", "lora", "--model", "tiny-random", "--data", str(ds), "--out", str(tmp_path / "o1"),
                 "--rank", "4", "--alpha", "4", "--validation-split", "0", *common]) == 0
    assert main(["train", "lora", "--config", str(tmp_path / "o1" / "settings.toml"), "--out", str(tmp_path / "o2"),
                 *common]) == 0
    first, again = (load_file(tmp_path / o / "lora.safetensors") for o in ("o1", "o2"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)

@pytest.mark.parametrize("body, says", [
    ("[[datasets]]\nbucket_no_upscale = true\n[[datasets.subsets]]\nimage_dir = '{a}'\n"
     "[[datasets]]\nbucket_no_upscale = false\n[[datasets.subsets]]\nimage_dir = '{b}'\n",
     "bucket_no_upscale is True for {a} and False for {b}; sdtune trains every image with one bucket_no_upscale: give "
     "it once, in [general]"),
    ("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{a}'\nresolution = 48\n",
     "resolution in the subset of '{a}': a dataset's setting in sd-scripts, which refuses it in a subset; move it to "
     "its [[datasets]] table (or [general])"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{a}'\n[[datasets.subsets]]\nimage_dir = '{b}'\n"
     "is_reg = true\nfoo_bar = 2\n",
     "the subset of {b}: unknown setting for lora training: 'foo_bar'"),
    ("[[datasets]]\nenable_bucket = true\n[[datasets.subsets]]\nimage_dir = '{a}'\n"
     "[[datasets]]\nenable_bucket = false\n[[datasets.subsets]]\nimage_dir = '{b}'\n",
     "enable_bucket is True for {a} and False for {b}"),
    ("[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = '{a}'\n"
     "[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{b}'\n",
     "its datasets train at several resolutions and {b} gives none; give each [[datasets]] its resolution"),
    ("[[datasets]]\nresolution = [512, 768]\n[[datasets.subsets]]\nimage_dir = '{a}'\n",
     "resolution = [512, 768]: sdtune trains at a square size whose area its buckets keep; give resolution = 576"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{a}'\nmetadata_file = 'meta.json'\n",
     "metadata_file 'meta.json' is not a file; give the path of the subset's metadata JSON"),
    ("[[datasets]]\n[[datasets.subsets]]\nmetadata_file = '{a}/0.txt'\n", "0.txt: not a readable metadata file"),
    ("[[datasets]]\n[[datasets.subsets]]\nmetadata_file = '{a}/list.json'\n",
     "list.json: not sd-scripts' fine-tuning metadata (an object of image keys"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{a}'\n[[datasets.subsets]]\nimage_dir = '{b}'\n"
     "metadata_file = '{a}/meta.json'\nis_reg = true\n",
     "with is_reg: a fine-tuning subset holds training images (as in sd-scripts)"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{a}'\nconditioning_data_dir = '{b}'\n",
     "conditioning_data_dir = '{b}': the subset's masks (--masked_loss) in another folder; sdtune reads an image's "
     "mask beside it, as NAME.mask.png"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{a}/nothing'\n", "image_dir '{a}/nothing' is not a folder"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{a}'\nnum_repeats = 0\n",
     "num_repeats = 0 for {a}: must be a whole number, 1 or more"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{a}'\nis_reg = true\n", "every subset is is_reg"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{a}'\nface_crop_aug_range = '2.0,4.0'\n",
     "sdtune does not offer face_crop_aug_range"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{a}'\nnot_a_key = 1\n", "unknown setting for lora"),
    ("[[datasets]\n", "not a readable dataset config"),
    ("general = 1\n[[datasets]]\n", "a dataset config holds a [general] table and [[datasets]] tables"),
    ("[[datasets]]\nsubsets = ['{a}']\n", "a dataset config holds a [general] table and [[datasets]] tables"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{a}'\ncaption_extension = '.cap'\n",
     "caption_extension = '.cap' for {a}: sdtune reads captions from .txt and .caption files"),
])
def test_what_sdtune_cannot_read_is_one_line_naming_the_file(tmp_path, body, says):
    a, b = images(tmp_path / "a", 1, "x"), images(tmp_path / "b", 1, "y")
    (a / "list.json").write_text('["0.png"]')
    (a / "meta.json").write_text('{"0": {"caption": "x"}}')
    ds = dataset_file(tmp_path / "ds.toml", body.format(a=a, b=b))
    with pytest.raises(SdtuneError) as e:
        load_settings(None, {"data": str(ds)}, "lora", family="sd1")
    named = ds if "metadata file" not in says and "metadata (" not in says else next(a.glob(says.split(":")[0]))
    assert str(e.value).startswith(f"{named}: ") and says.format(a=a, b=b) in str(e.value)
    assert "\n" not in str(e.value)


def test_class_images_of_a_dataset_config_are_for_lora_only_and_not_drawn(tmp_path):
    a = images(tmp_path / "a", 1, "x")
    ds = dataset_file(tmp_path / "ds.toml", f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{a}'\n"
                                            f"[[datasets.subsets]]\nimage_dir = '{a}'\nis_reg = true\n")
    with pytest.raises(SdtuneError, match="textual inversion does not use"):
        load_settings(None, {"data": str(ds), "token": "<t>"}, "ti", family="sd1")
    s = load_settings(None, {"data": str(ds), "out": str(tmp_path / "out"), "class_prompt": "a cat"}, "lora", "sd1")
    with pytest.raises(SdtuneError, match="is a dataset config"):
        s.check()
    s = load_settings(None, {"data": str(ds), "out": str(a / "out")}, "lora", "sd1")
    with pytest.raises(SdtuneError, match=r"--out .* is inside --data .*ds.toml's image_dir"):
        s.check()


def test_a_dataset_config_trains_the_weights_its_folders_would(tmp_path, capsys):
    """Two subsets and a reg one, through the CLI, equal --data with 2_sks shape and 1_more folders and --reg-dir."""
    data = outline_dataset(tmp_path / "src")
    shots = sorted(data.glob("*.png"))
    folder = tmp_path / "folder"
    for sub, chosen, keep_captions in (("2_sks shape", shots[:2], False), ("1_more", shots[2:], True)):
        (folder / sub).mkdir(parents=True)
        for shot in chosen:
            shutil.copy(shot, folder / sub / shot.name)
            if keep_captions:
                shutil.copy(shot.with_suffix(".txt"), folder / sub / shot.with_suffix(".txt").name)
    reg = images(tmp_path / "reg", 2, caption="a shape")
    common = ["--model", "tiny-random", "--steps", "2", "--batch-size", "2", "--rank", "4", "--alpha", "4",
              "--validation-split", "0", "--no-text-encoder", "--no-report", "--no-progress", "--sample-every", "0"]
    assert main(["train", "lora", "--data", str(folder), "--reg-dir", str(reg), "--out", str(tmp_path / "o1"),
                 *common]) == 0
    ds = dataset_file(tmp_path / "ds.toml", f"""[general]
shuffle_caption = false
[[datasets]]
batch_size = 2
  [[datasets.subsets]]
  image_dir = "{folder / '1_more'}"
  [[datasets.subsets]]
  image_dir = "{folder / '2_sks shape'}"
  num_repeats = 2
  class_tokens = "sks shape"
  [[datasets.subsets]]
  image_dir = "{reg}"
  is_reg = true
""")
    cfg = dataset_file(tmp_path / "config_lora.toml", f'pretrained_model_name_or_path = "tiny-random"\n'
                                                      f'dataset_config = "{ds}"\noutput_dir = "{tmp_path / "o2"}"\n'
                                                      f'network_dim = 4\nnetwork_alpha = 4\nmax_train_steps = 2\n')
    assert main(["train", "lora", "--config", str(cfg), *common]) == 0
    capsys.readouterr()
    first, second = (tmp_path / o / "lora.safetensors" for o in ("o1", "o2"))
    a, b = load_file(first), load_file(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(second), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ss_dataset_dirs"]) == {"1_more": {"n_repeats": 1, "img_count": 2},
                                                   "2_sks shape": {"n_repeats": 2, "img_count": 2}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"reg": {"n_repeats": 1, "img_count": 2}}
    saved = (tmp_path / "o2" / loop.SETTINGS_FILE).read_text()
    assert f'data = "{ds}"' in saved and f'reg_dir = "{ds}"' in saved
    assert main(["train", "lora", "--config", str(tmp_path / "o2" / loop.SETTINGS_FILE), "--no-progress"]) == 0
    assert "already finished" in capsys.readouterr().err  # its own settings name the same run


def test_each_subsets_caption_options_train_as_its_captions_with_them_written_in(tmp_path, capsys):
    """A subset's own prefix, suffix and kept tags (sd-scripts lets each subset give its own) train the weights that
    captions with the prefix and suffix written in do, through the CLI; the text encoder reads them cached."""
    data = outline_dataset(tmp_path / "src")
    shots = sorted(data.glob("*.png"))
    folder, plain = tmp_path / "folder", tmp_path / "plain"
    for sub, chosen, edit in (("1_a", shots[:2], "sks, {}"), ("1_b", shots[2:], "{} in outline style")):
        for root, text in ((folder, edit), (plain, "{}")):
            (root / sub).mkdir(parents=True)
            for shot in chosen:
                shutil.copy(shot, root / sub / shot.name)
                caption = shot.with_suffix(".txt").read_text().strip()
                (root / sub / shot.with_suffix(".txt").name).write_text(text.format(caption))
    common = ["--model", "tiny-random", "--steps", "2", "--batch-size", "2", "--rank", "4", "--alpha", "4",
              "--validation-split", "0", "--no-text-encoder", "--no-report", "--no-progress", "--sample-every", "0"]
    assert main(["train", "lora", "--data", str(folder), "--out", str(tmp_path / "o1"), *common]) == 0
    ds = dataset_file(tmp_path / "ds.toml", f"""[general]
keep_tokens = 1
[[datasets]]
  [[datasets.subsets]]
  image_dir = "{plain / '1_a'}"
  caption_prefix = "sks,"
  [[datasets.subsets]]
  image_dir = "{plain / '1_b'}"
  caption_suffix = "in outline style"
  keep_tokens = 2
""")
    scan = scan_data(ds)
    # (what a subset does not give is the run's: no suffix for a, no prefix for b)
    assert [ex.options for ex in scan.examples] == [{"caption_prefix": "sks,", "keep_tokens": 1}] * 2 + \
        [{"caption_suffix": "in outline style", "keep_tokens": 2}] * 2
    assert main(["train", "lora", "--data", str(ds), "--out", str(tmp_path / "o2"), *common]) == 0
    a, b = (load_file(tmp_path / o / "lora.safetensors") for o in ("o1", "o2"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the validation loss (on the training images, their captions as trained) is the same too
    said = capsys.readouterr().err
    assert said.count("step 2: validation loss") == 2
    assert len({line for line in said.splitlines() if line.startswith("step 2: validation loss")}) == 1
    # an edited subset option is another run's data: no resume under it
    ds.write_text(ds.read_text().replace('"sks,"', '"sks2,"'))
    assert main(["train", "lora", "--data", str(ds), "--out", str(tmp_path / "o2"), *common, "--steps", "3"]) != 0
    assert "changed since this run was saved" in capsys.readouterr().err


def test_datasets_at_several_resolutions_bucket_each_image_at_its_own(tmp_path, capsys):
    """sd-scripts' multi-resolution training: each [[datasets]] at its resolution, the batches of one size each."""
    small = images(tmp_path / "small", 2, caption="a small square")
    large = tmp_path / "large"
    large.mkdir()
    for i in range(2):
        Image.new("RGB", (128, 128), (40, 40 + 30 * i, 200)).save(large / f"{i}.png")
        (large / f"{i}.txt").write_text(f"a large square {i}")
    ds = dataset_file(tmp_path / "ds.toml", f"""[general]
batch_size = 2
[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = "{small}"
[[datasets]]
resolution = "128,128"
  [[datasets.subsets]]
  image_dir = "{large}"
""")
    assert [ex.options for ex in scan_data(ds).examples] == [{"resolution": 64}] * 2 + [{"resolution": 128}] * 2
    out = tmp_path / "out"
    assert main(["train", "lora", "--model", "tiny-random", "--data", str(ds), "--out", str(out), "--steps", "2",
                 "--rank", "4", "--validation-split", "0", "--no-report", "--no-progress", "--sample-every", "0"]) == 0
    assert "; 64 and 128 px (its datasets' sizes)" in capsys.readouterr().err
    meta = json.loads(read_metadata(out / "lora.safetensors")["ss_bucket_info"])["buckets"]
    assert sorted((tuple(b["resolution"]), b["count"]) for b in meta.values()) == [((64, 64), 2), ((128, 128), 2)]
    with pytest.raises(SdtuneError, match=rf"^--resolution 64: {ds} gives each of its subsets its own resolution, so"):
        load_settings(None, {"data": str(ds), "resolution": 64}, "lora", family="sd1")


def test_a_fine_tuning_subset_trains_the_images_and_captions_its_metadata_names(tmp_path, monkeypatch):
    """sd-scripts' metadata_file (its finetune/ scripts' JSON): a key is an image's name in image_dir (with or
    without its extension) or its path; the caption and then the tags; the folder's caption files and other
    images are not used, and what is left out is said."""
    folder = images(tmp_path / "imgs", 5, caption="a caption file")  # 0-4.png, each with a .txt not used
    elsewhere = images(tmp_path / "elsewhere", 1)
    (folder / "meta.json").write_text(json.dumps({
        "0": {"caption": "a red square", "tags": "red, square"},
        "1.png": {"tags": "only tags"},
        str(elsewhere / "0.png"): {"caption": "from elsewhere\nanother line", "train_resolution": [64, 64]},
        "gone": {"caption": "no such image"},
        "2": {"caption": ""},
        "3": {"caption": "a list of tags", "tags": ["one", "two"]},  # (some taggers write a list)
    }))
    monkeypatch.chdir(tmp_path)
    ds = dataset_file(tmp_path / "ds.toml", "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'imgs'\n"
                                            "metadata_file = 'imgs/meta.json'\nnum_repeats = 3\n")
    scan = scan_data(ds)
    got = sorted((ex.path.relative_to(tmp_path).as_posix(), ex.caption, ex.repeats, ex.name) for ex in scan.examples)
    assert got == [("elsewhere/0.png", "from elsewhere", 3, "imgs" + (elsewhere / "0.png").resolve().as_posix()),
                   ("imgs/0.png", "a red square, red, square", 3, "imgs/0.png"),
                   ("imgs/1.png", "only tags", 3, "imgs/1.png"), ("imgs/2.png", "", 3, "imgs/2.png"),
                   ("imgs/3.png", "a list of tags, one, two", 3, "imgs/3.png")]
    assert scan.folders == {"imgs": {"n_repeats": 3, "img_count": 5}}
    meta = (folder / "meta.json").resolve()
    assert scan.unused == [f"{meta}: 1 of its images are neither a file nor in {folder.resolve()} and are not used (gone)",
                           f"{meta}: 1 caption(s) have more than one line; only the first is used, as kohya reads a "
                           f"caption file; give --wildcards to draw one of them each time",
                           f"{folder.resolve()}: 1 image(s) its metadata_file does not name are not used, as "
                           f"sd-scripts reads a fine-tuning subset (4.png)"]
    wild = {ex.path.parent.name: ex.caption for ex in scan_data(ds, all_lines=True).examples if ex.path.stem == "0"}
    assert wild == {"elsewhere": "from elsewhere\nanother line", "imgs": "a red square, red, square"}
    # without image_dir: the keys are the images' paths (or names beside the metadata file)
    alone = dataset_file(tmp_path / "alone.toml", "[[datasets]]\n[[datasets.subsets]]\n"
                                                  "metadata_file = 'imgs/meta.json'\n")
    assert sorted(ex.caption for ex in scan_data(alone).examples) == ["", "a list of tags, one, two",
                                                                       "a red square, red, square",
                                                                       "from elsewhere", "only tags"]


def test_a_fine_tuning_subset_trains_the_weights_its_captions_as_files_would(tmp_path, capsys):
    """Through the CLI: a metadata_file's captions and tags train bit for bit what the same captions in .txt files
    train."""
    data = outline_dataset(tmp_path / "src")
    folder = tmp_path / "imgs"
    folder.mkdir()
    metadata = {}
    for i, shot in enumerate(sorted(data.glob("*.png"))):
        shutil.copy(shot, folder / shot.name)
        caption = shot.with_suffix(".txt").read_text().strip()
        head, _, rest = caption.partition(",")
        metadata[shot.stem if i % 2 else shot.name] = {"caption": head, "tags": rest.strip()} if rest else \
            {"caption": caption}
        (folder / shot.with_suffix(".txt").name).write_text("not this caption")
    (tmp_path / "meta.json").write_text(json.dumps(metadata))
    common = ["--model", "tiny-random", "--steps", "2", "--batch-size", "2", "--rank", "4", "--alpha", "4",
              "--validation-split", "0", "--no-text-encoder", "--no-report", "--no-progress", "--sample-every", "0"]
    assert main(["train", "lora", "--data", str(data), "--out", str(tmp_path / "o1"), *common]) == 0
    ds = dataset_file(tmp_path / "ds.toml", f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{folder}'\n"
                                            f"metadata_file = 'meta.json'\n")
    assert main(["train", "lora", "--data", str(ds), "--out", str(tmp_path / "o2"), *common]) == 0
    capsys.readouterr()
    a, b = (load_file(tmp_path / o / "lora.safetensors") for o in ("o1", "o2"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def mean_std_noise(data: TrainingSet, number: int, which: str) -> torch.Tensor:
    """Batch ``number`` (of 1) drawn from ``data``'s ``which`` encodings ("latents" or "flipped") of its image, with
    the noise the batch draws after its flip."""
    ids = data.plan(number // data.batches_per_epoch(1), 1)[number % data.batches_per_epoch(1)]
    mean, std = getattr(data, which)[(64, 64)][data.row_of[ids[0]]].unsqueeze(0).chunk(2, 1)
    g = torch.Generator().manual_seed(seed_for(0, "batch", number))
    torch.rand(1, generator=g)
    return (mean + std * torch.randn((1, *mean.shape[1:]), generator=g))[0]


def test_each_subsets_flip_aug_flips_its_own_images(tmp_path, base):
    """flip_aug per subset: its images draw the flips a run where every image flips draws, the others none."""
    a, b = images(tmp_path / "a", 2, caption="flips"), images(tmp_path / "b", 2, caption="stays", colour=(40, 40, 200))
    for image in [*a.glob("*.png"), *b.glob("*.png")]:  # (a half of each in another colour: its mirror differs)
        drawn = Image.open(image).convert("RGB")
        drawn.paste((250, 250, 250), (0, 0, 32, 64))
        drawn.save(image)
    ds = dataset_file(tmp_path / "ds.toml", f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{a}'\nflip_aug = true\n"
                                            f"[[datasets.subsets]]\nimage_dir = '{b}'\n")
    scan = scan_data(ds)
    assert [ex.options for ex in scan.examples] == [{"flip": True}] * 2 + [{}] * 2  # (b: the run's)

    def every(flip: bool):  # the same images, all flipping or none
        return dataclasses.replace(scan, examples=[dataclasses.replace(ex, options={"flip": flip})
                                                   for ex in scan.examples])
    mixed, flipping = (TrainingSet(s, base.vae, 64, seed=0) for s in (scan, every(True)))
    assert mixed.flip and mixed.flips == [True, True, False, False]
    flipped = []
    for number in range(24):
        got = mixed.batch(number, 1)
        if got.captions[0].startswith("flips"):  # as where every image flips: the same draws
            want = flipping.batch(number, 1)
            assert got.captions == want.captions and torch.equal(got.latents, want.latents)
            flipped.append(torch.equal(got.latents[0], mean_std_noise(flipping, number, "flipped")))
        else:  # the same noise, never its mirror image
            assert torch.equal(got.latents[0], mean_std_noise(mixed, number, "latents"))
    assert set(flipped) == {True, False}
    # --flip: the images of the subset that gives no flip_aug flip too (sd-scripts' --flip_aug is its fallback)
    assert load_settings(None, {"data": str(ds), "flip": True}, "lora", family="sd1").flip
    assert TrainingSet(scan, base.vae, 64, seed=0, flip=True).flips == [True] * 4


def test_each_subsets_random_crop_and_color_aug_are_its_own(tmp_path, base):
    """random_crop and color_aug per subset: its images draw what a run where every image has them draws, the
    others are cut in the middle with their colours, encoded at each step beside them."""
    rng = np.random.default_rng(0)
    folders = {}
    for name in ("moves", "stays"):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(folders[name] / f"{i}.png")
            (folders[name] / f"{i}.txt").write_text(f"{name} {i}")
    ds = dataset_file(tmp_path / "ds.toml", f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{folders['moves']}'\n"
                                            f"random_crop = true\ncolor_aug = true\n"
                                            f"[[datasets.subsets]]\nimage_dir = '{folders['stays']}'\n")
    scan = scan_data(ds)
    assert [ex.options for ex in scan.examples] == [{"crop": "random", "color_aug": True}] * 2 + [{}] * 2
    every = dataclasses.replace(scan, examples=[dataclasses.replace(ex, options={"crop": "random", "color_aug": True})
                                                for ex in scan.examples])
    mixed, moving = TrainingSet(scan, base.vae, 64, seed=0), TrainingSet(every, base.vae, 64, seed=0)
    assert mixed.per_step and mixed.crops == ["random"] * 2 + ["center"] * 2
    for number in range(8):
        got = mixed.batch(number, 1)
        if got.captions[0].startswith("moves"):
            assert torch.equal(got.latents, moving.batch(number, 1).latents)
        else:  # the middle, its own colours, the noise drawn after the crop's and the colour's draws
            ids = mixed.plan(number // mixed.batches_per_epoch(1), 1)[number % mixed.batches_per_epoch(1)]
            g = torch.Generator().manual_seed(seed_for(0, "batch", number))
            torch.rand(1, 2, generator=g), torch.rand(1, generator=g)
            image = fit(mixed.pixels[(64, 64)][mixed.row_of[ids[0]]], (64, 64))
            mean, std = encode(base.vae, to_tensor(image).unsqueeze(0)).chunk(2, 1)
            assert torch.equal(got.latents, mean + std * torch.randn((1, *mean.shape[1:]), generator=g))
    # --crop random: the subset that gives no random_crop takes it (as sd-scripts' --random_crop)
    assert load_settings(None, {"data": str(ds), "crop": "random"}, "lora", family="sd1").crop == "random"
    assert TrainingSet(scan, base.vae, 64, seed=0, crop="random").crops == ["random"] * 4
