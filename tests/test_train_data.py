"""Training data: image modes, EXIF, repeats, captions, buckets, errors, the latent cache and batch plans."""

import random
import re
from collections import Counter

import numpy as np
import pytest
import small_runs
import torch
from PIL import Image

from sdtune.cli import main
from sdtune.console import SdtuneWarning
from sdtune.safeio import SdtuneError, read_metadata
from sdtune.tiny import model as tiny
from sdtune.train import captions, data, images
from sdtune.train.captions import process_caption
from sdtune.train.config import LoraSettings
from sdtune.train.data import TrainingSet
from sdtune.train.images import bucket_sizes, fit, open_rgb, pick_bucket, to_tensor
from sdtune.train.lora import train_lora
from sdtune.train.scan import report_skipped, scan_folder


@pytest.fixture(scope="module")
def vae():
    return tiny.build(seed=0)["vae"].eval()


def solid(path, colour=(200, 30, 30), size=(64, 64), mode="RGB", caption="a red square"):
    Image.new(mode, size, colour).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption + "\n")
    return path


# ---------------------------------------------------------------- image modes

def test_every_mode_becomes_8bit_rgb_with_transparency_on_white(tmp_path):
    cases = {
        "rgba.png": (Image.new("RGBA", (8, 8), (255, 0, 0, 0)), (255, 255, 255)),  # fully transparent red
        "rgba_half.png": (Image.new("RGBA", (8, 8), (0, 0, 0, 128)), (127, 127, 127)),
        "la.png": (Image.new("LA", (8, 8), (0, 0)), (255, 255, 255)),
        "gray.png": (Image.new("L", (8, 8), 77), (77, 77, 77)),
        "bw.png": (Image.new("1", (8, 8), 1), (255, 255, 255)),
        "cmyk.jpg": (Image.new("CMYK", (8, 8), (0, 0, 0, 0)), (255, 255, 255)),
        "photo.avif": (Image.new("RGB", (8, 8), (200, 30, 60)), (200, 30, 60)),  # lossy: within 2 levels
        "rgba.avif": (Image.new("RGBA", (8, 8), (255, 0, 0, 0)), (255, 255, 255)),
        "gray16.png": (Image.fromarray(np.full((8, 8), 65535, np.uint16)), (255, 255, 255)),
        "gray16_mid.png": (Image.fromarray(np.full((8, 8), 32896, np.uint16)), (128, 128, 128)),
    }
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 255, 0] + [0] * 765)
    pal.info["transparency"] = 0
    cases["palette_transparent.png"] = (pal, (255, 255, 255))
    for name, (img, want) in cases.items():
        img.save(tmp_path / name)
        got = open_rgb(tmp_path / name)
        assert got.mode == "RGB", name
        pixel = got.getpixel((4, 4))
        assert all(abs(a - b) <= 2 for a, b in zip(pixel, want)), (name, pixel, want)


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    img.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    up = open_rgb(tmp_path / "phone.jpg")
    assert up.size == (20, 40) and images.upright_size(tmp_path / "phone.jpg") == (20, 40)  # buckets see it tall
    top, bottom = up.getpixel((10, 5)), up.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60, top  # the stored left (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_fit_covers_then_crops_center_and_placed():
    img = Image.new("RGB", (100, 50), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 25, 50))  # white left quarter
    out = fit(img, (32, 32))
    assert out.size == (32, 32)
    assert out.getpixel((0, 16))[0] < 30  # center crop of the 64x32 resize starts at x=16: black
    left = fit(img, (32, 32), (0.0, 0.5))
    assert left.getpixel((2, 16))[0] > 220  # crop placed on the left: white quarter visible
    t = to_tensor(out)
    assert t.shape == (3, 32, 32) and t.min() >= -1 and t.max() <= 1


# ---------------------------------------------------------------- folders and captions

def test_captions_repeats_and_folder_names(tmp_path):
    solid(tmp_path / "a.png", caption="from txt")
    solid(tmp_path / "b.png", caption=None)
    (tmp_path / "b.caption").write_text("\n  from caption file \n")
    solid(tmp_path / "c.png", caption="txt wins")
    (tmp_path / "c.caption").write_text("not used")
    sub = tmp_path / "3_sks dog"
    sub.mkdir()
    solid(sub / "d.png", caption=None)  # no caption: the folder's name
    solid(sub / "e.png", caption="own caption")
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / ".hidden").mkdir()
    solid(tmp_path / ".hidden" / "x.png", caption="hidden")
    scan = scan_folder(tmp_path)
    got = {e.path.name: (e.caption, e.repeats) for e in scan.examples}
    assert got == {"a.png": ("from txt", 1), "b.png": ("from caption file", 1), "c.png": ("txt wins", 1),
                   "d.png": ("sks dog", 3), "e.png": ("own caption", 3)}
    assert scan.folders == {".": {"n_repeats": 1, "img_count": 3}, "3_sks dog": {"n_repeats": 3, "img_count": 2}}


def test_missing_captions_need_a_default_caption(tmp_path):
    solid(tmp_path / "a.png", caption=None)
    solid(tmp_path / "b.png", caption="ok")
    with pytest.raises(SdtuneError, match=r"1 image\(s\) have no caption \(a.png\).*--default-caption"):
        scan_folder(tmp_path)
    scan = scan_folder(tmp_path, default_caption="a thing")
    assert {e.path.name: e.caption for e in scan.examples} == {"a.png": "a thing", "b.png": "ok"}
    assert scan_folder(tmp_path, require_captions=False).examples[0].caption is None


def test_unreadable_images_are_skipped_and_listed(tmp_path):
    solid(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "empty.jpg").write_bytes(b"")
    scan = scan_folder(tmp_path, default_caption="x")
    assert [e.path.name for e in scan.examples] == ["good.png"]
    assert sorted(p.name for p, _ in scan.skipped) == ["broken.png", "empty.jpg"]
    assert all(why for _, why in scan.skipped)


def test_caption_files_that_are_not_used_as_they_stand_are_noted(tmp_path):
    for name in ("a", "b", "c"):
        solid(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("a red star")
    (tmp_path / "a.caption").write_text("ignored")  # .txt wins
    (tmp_path / "b.txt").write_text("  \n")  # empty: an empty caption
    (tmp_path / "c.txt").write_text("a blue circle")
    (tmp_path / "ghost.txt").write_text("no image")  # no image beside it
    (tmp_path / "3_sub").mkdir()
    solid(tmp_path / "3_sub" / "d.png")
    (tmp_path / "3_sub" / "lost.caption").write_text("x")
    scan = scan_folder(tmp_path)
    assert [e.caption for e in scan.examples][:3] == ["a red star", "", "a blue circle"]
    assert scan.unused == [
        f"{tmp_path}: 1 caption file(s) have no image beside them and are not used (ghost.txt)",
        f"{tmp_path}: 1 image(s) have both a .txt and a .caption file; the .txt is used (a.caption not)",
        f"{tmp_path}: 1 caption file(s) are empty, so their images train with an empty caption (b.txt)",
        f"{tmp_path / '3_sub'}: 1 caption file(s) have no image beside them and are not used (lost.caption)"]
    with pytest.warns(SdtuneWarning) as seen:
        report_skipped(scan)
    assert [str(w.message) for w in seen] == scan.unused


def test_empty_or_unreadable_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SdtuneError, match="no images found"):
        scan_folder(tmp_path)
    (tmp_path / "x.png").write_bytes(b"junk")
    with pytest.raises(SdtuneError, match="none of its 1 image"):
        scan_folder(tmp_path)
    with pytest.raises(SdtuneError, match="not a folder"):
        scan_folder(tmp_path / "missing")


def test_non_utf8_caption_is_a_clear_error(tmp_path):
    solid(tmp_path / "a.png", caption=None)
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 \xff\xfe")
    with pytest.raises(SdtuneError, match="a.txt: caption is not UTF-8"):
        scan_folder(tmp_path)


def test_caption_shuffle_keeps_tokens_and_dropout_rate():
    rng = random.Random(0)
    text = "sks, dog, grass, sunny, park, ball"
    seen = set()
    for _ in range(50):
        out = process_caption(text, rng, shuffle=True, keep_tokens=2)
        tags = out.split(", ")
        assert tags[:2] == ["sks", "dog"] and sorted(tags) == sorted(text.split(", "))
        seen.add(out)
    assert len(seen) > 10
    dropped = sum(process_caption(text, rng, dropout=0.3) == "" for _ in range(2000))
    assert 500 < dropped < 700
    assert process_caption(text, rng) == text


def test_caption_tag_dropout_leaves_out_tags_but_the_kept_ones_in_their_order():
    rng = random.Random(0)
    text = "sks, dog, grass, sunny, park, ball"
    counts = {t: 0 for t in text.split(", ")}
    for _ in range(2000):
        tags = process_caption(text, rng, keep_tokens=2, tag_dropout=0.25).split(", ")
        assert tags[:2] == ["sks", "dog"]
        assert tags == [t for t in text.split(", ") if t in tags]  # no shuffle: the order stays
        for t in tags:
            counts[t] += 1
    assert counts["sks"] == counts["dog"] == 2000
    assert all(1400 < counts[t] < 1600 for t in ("grass", "sunny", "park", "ball"))  # each kept 75% of the time
    # with a shuffle too: the kept tags in front, the rest shuffled and thinned
    out = {process_caption(text, rng, shuffle=True, keep_tokens=1, tag_dropout=0.5) for _ in range(200)}
    assert all(o.startswith("sks") for o in out) and len(out) > 50
    with pytest.raises(SdtuneError, match=r"--caption-tag-dropout 1.0: must be in \[0, 1\)"):
        LoraSettings(data="d", out="o", caption_tag_dropout=1.0).check()


def test_keep_tokens_separator_holds_the_front_and_the_end_and_never_reaches_the_text(tmp_path):
    rng = random.Random(0)
    text = "sks, 1girl ||| red hair, blue eyes;;;long sleeves, smile, park ||| masterpiece, best quality"
    opts = dict(separator="|||", group=";;;", keep_tokens=3)  # keep_tokens is not used where the separator is
    seen = set()
    for _ in range(300):
        tags = process_caption(text, rng, shuffle=True, tag_dropout=0.2, **opts).split(", ")
        assert tags[:2] == ["sks", "1girl"] and tags[-2:] == ["masterpiece", "best quality"]
        middle = tags[2:-2]
        # the group moves and drops as one: both of its tags or neither, side by side
        assert ("blue eyes" in middle) == ("long sleeves" in middle)
        if "blue eyes" in middle:
            assert middle.index("long sleeves") == middle.index("blue eyes") + 1
        seen.add(tuple(middle))
    assert len(seen) > 20 and not any("|" in t or ";" in t for m in seen for t in m)
    # without shuffling or dropout: the same caption every time, separators out
    steady = process_caption(text, rng, **opts)
    assert steady == "sks, 1girl, red hair, blue eyes, long sleeves, smile, park, masterpiece, best quality"
    # one separator: only the front is held; a caption without one keeps --keep-tokens
    assert process_caption("a, b ||| c, d", rng, separator="|||") == "a, b, c, d"
    assert all(process_caption("a, b, c, d", rng, shuffle=True, keep_tokens=2, separator="|||")[:4] == "a, b"
               for _ in range(20))
    # kohya's prefix and suffix: joined by a space, around the processed tags, never moved
    out = process_caption("x, y, z", rng, shuffle=True, prefix="photo of sks,", suffix=", film grain")
    assert out.startswith("photo of sks, ") and out.endswith(" , film grain")
    assert sorted(out[len("photo of sks, "):-len(" , film grain")].split(", ")) == ["x", "y", "z"]
    assert process_caption("x", rng, dropout=0.999, prefix="p") == ""


def test_every_nth_epoch_trains_with_empty_captions_and_the_cache_knows_them(tmp_path, vae):
    for i in range(2):
        solid(tmp_path / f"{i}.png", colour=(90 * i, 20, 200), caption=f"tag{i} ||| x")
    ts = TrainingSet(scan_folder(tmp_path), vae, 64, seed=0, bucket_step=16, empty_every=2,
                     captions=dict(separator="|||", prefix="sks"))
    assert not ts.captions_vary and ts.possible_captions() == ["", "sks tag0, x", "sks tag1, x"]
    per_epoch = ts.batches_per_epoch(1)  # 2: epochs 1, 3 (kohya's count) keep their captions, 2, 4 lose them
    captions = [ts.batch(n, 1).captions[0] for n in range(4 * per_epoch)]
    assert [set(captions[e * per_epoch:(e + 1) * per_epoch]) for e in range(4)] == [
        {"sks tag0, x", "sks tag1, x"}, {""}, {"sks tag0, x", "sks tag1, x"}, {""}]


def test_captions_that_lose_tags_vary_so_their_encodings_are_not_cached(tmp_path, vae):
    solid(tmp_path / "a.png", size=(64, 64))
    (tmp_path / "a.txt").write_text("sks, dog, grass, park")
    assert not TrainingSet(scan_folder(tmp_path), vae, 64, seed=0, bucket_step=16).captions_vary
    thinned = TrainingSet(scan_folder(tmp_path), vae, 64, seed=0, bucket_step=16, captions=dict(tag_dropout=0.5))
    assert thinned.captions_vary
    assert len({thinned.batch(n, 1).captions[0] for n in range(30)}) > 3


def test_token_warm_up_grows_the_tags_as_kohya_counts_them(tmp_path, vae):
    """kohya's token warm-up: before step N, the first min + step x (n - min) / N of the n tags after keep_tokens
    (before the shuffle; floored, as kohya's), then all; a step is grad_accum batches; the captions vary."""
    tags = "sks, red, square, grass, park, sky"  # sks kept (keep_tokens 1), 5 more
    for step, want in ((0, "sks, red, square"), (1, "sks, red, square"), (2, "sks, red, square, grass"),
                       (3, "sks, red, square, grass, park"), (4, tags), (9, tags)):
        kept = process_caption(tags, random.Random(0), keep_tokens=1, warm=(step, 2, 4))
        assert kept == want and len(kept.split(", ")) - 1 == min(5, 2 + (step * (5 - 2)) // 4), step
    # the kept tags are the first ones; a shuffle then moves those, a separator's head and end stay
    assert set(process_caption(tags, random.Random(3), shuffle=True, keep_tokens=1, warm=(0, 2, 4)).split(", ")) == \
        {"sks", "red", "square"}
    assert process_caption("a, b ||| c, d, e ||| f", random.Random(0), separator="|||", warm=(0, 1, 2)) == "a, b, c, f"
    solid(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text(tags)
    ts = TrainingSet(scan_folder(tmp_path), vae, 64, seed=0, bucket_step=16, captions=dict(keep_tokens=1))
    assert not ts.captions_vary
    ts.warm_tokens(4, 2, grad_accum=2)  # 4 steps of 2 batches each
    assert ts.captions_vary
    assert [len(ts.batch(n, 1).captions[0].split(", ")) for n in range(10)] == [3, 3, 3, 3, 4, 4, 5, 5, 6, 6]


def test_a_token_warm_up_run_resumes_exactly_and_trains_other_weights(base, tmp_path):
    dataset = small_runs.outline_dataset(tmp_path / "data")
    warm = small_runs.resumes_exactly(base, dataset, tmp_path / "warm", token_warmup_ratio=0.75, token_warmup_min=0)
    plain = train_lora(base, small_runs.settings(dataset, tmp_path / "plain"))
    a, b = small_runs.factors(warm), small_runs.factors(plain)
    assert any(not torch.equal(x, y) for k in a for x, y in zip(a[k], b[k]))  # (its first steps' captions differ)


def test_color_aug_turns_the_hue_of_each_image_by_its_draw(tmp_path, vae, base):
    """kohya's color_aug: a hue turn of up to 8/180 of the circle either way, drawn per image and step, on images
    encoded at each step (center crops too); a run with it resumes exactly."""
    red = images.shift_hue(Image.new("RGB", (8, 8), (255, 0, 0)), images.COLOR_AUG_TURN).getpixel((0, 0))
    assert red[0] == 255 and 60 <= red[1] <= 70 and red[2] == 0  # 16 degrees: towards yellow
    back = images.shift_hue(Image.new("RGB", (8, 8), (255, 0, 0)), -images.COLOR_AUG_TURN).getpixel((0, 0))
    assert back[0] == 255 and back[1] == 0 and 55 <= back[2] <= 70  # (the other way: towards magenta)
    grey = Image.new("RGB", (8, 8), (120, 120, 120))
    assert images.shift_hue(grey, images.COLOR_AUG_TURN).getpixel((0, 0)) == (120, 120, 120)
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
    image.with_suffix(".txt").write_text("noise")
    ts = TrainingSet(scan_folder(tmp_path), vae, 64, seed=0, bucket_step=16, color_aug=True)
    assert ts.per_step and not ts.latents and list(ts.pixels) == [(64, 64)]
    hues = []
    for number in range(3):
        g = torch.Generator().manual_seed(data.seed_for(0, "batch", number))
        hue = (torch.rand(1, generator=g) * 2 - 1).item()
        turned = images.shift_hue(fit(open_rgb(image), (64, 64)), hue * images.COLOR_AUG_TURN)
        mean, std = data.encode(vae, to_tensor(turned).unsqueeze(0)).chunk(2, 1)
        want = mean + std * torch.randn((1, *mean.shape[1:]), generator=g)
        assert torch.equal(ts.batch(number, 1).latents, want)
        hues.append(hue)
    assert len(set(hues)) == 3 and all(-1 <= h <= 1 for h in hues)
    small_runs.resumes_exactly(base, small_runs.outline_dataset(tmp_path / "data"), tmp_path / "runs", color_aug=True)
    with pytest.raises(SdtuneError, match="--cache-latents-to-disk with --color-aug: its images are encoded every "
                                          "step"):
        LoraSettings(data=str(tmp_path), out=str(tmp_path.parent / "o"), color_aug=True,
                     cache_latents_to_disk=True).check()


# ---------------------------------------------------------------- buckets

def test_bucket_sizes_and_choice():
    sizes = bucket_sizes(512, 64)
    assert (512, 512) in sizes and (384, 640) in sizes and (640, 384) in sizes
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in sizes)
    assert all(256 <= w <= 1024 and 256 <= h <= 1024 for w, h in sizes)
    assert pick_bucket(1600, 900, sizes)[0] > pick_bucket(1600, 900, sizes)[1]
    assert pick_bucket(900, 1600, sizes)[0] < pick_bucket(900, 1600, sizes)[1]
    assert pick_bucket(700, 700, sizes) == (512, 512)


def test_buckets_group_mixed_sizes_and_batches_stay_in_one_bucket(tmp_path, vae):
    for i in range(3):
        solid(tmp_path / f"wide{i}.png", size=(128, 64))
        solid(tmp_path / f"tall{i}.png", size=(64, 128))
        solid(tmp_path / f"square{i}.png", size=(70, 70))
    ts = TrainingSet(scan_folder(tmp_path), vae, 64, seed=0, bucket_step=16, buckets=True)
    assert len(ts.sizes) == 3
    by_name = {e.path.name[:4]: ts.bucket_of[i] for i, e in enumerate(ts.scan.examples)}
    assert by_name["wide"][0] > by_name["wide"][1] and by_name["tall"][0] < by_name["tall"][1]
    assert by_name["squa"] == (64, 64)
    assert ts.batches_per_epoch(2) == 6  # 3 buckets x ceil(3 / 2)
    for n in range(6):
        b = ts.batch(n, 2)
        w, h = b.size
        assert b.latents.shape == (2, 4, h // 4, w // 4)
    flat = TrainingSet(scan_folder(tmp_path), vae, 64, seed=0, bucket_step=16)
    assert flat.sizes == [(64, 64)]


def test_bucket_sides_are_kohyas_min_and_max_bucket_reso(tmp_path, vae, base):
    for w, h in ((160, 40), (40, 160), (64, 64)):
        solid(tmp_path / f"{w}x{h}.png", size=(w, h))
    wide = TrainingSet(scan_folder(tmp_path), vae, 64, seed=0, bucket_step=16, buckets=True)
    assert min(min(s) for s in wide.sizes) == 32 and max(max(s) for s in wide.sizes) == 128  # 64 / 2, 64 x 2
    narrow = TrainingSet(scan_folder(tmp_path), vae, 64, seed=0, bucket_step=16, buckets=True, min_bucket_reso=48,
                         max_bucket_reso=80)
    assert all(48 <= side <= 80 for s in narrow.sizes for side in s) and (80, 48) in narrow.sizes
    ok = LoraSettings(data=str(tmp_path), out="o", buckets=True, bucket_step=16, min_bucket_reso=32, max_bucket_reso=128)
    assert data.bucket_options(base, ok) == dict(resolution=64, bucket_step=16, buckets=True, min_bucket_reso=32,
                                                 max_bucket_reso=128, no_upscale=False)
    for kw, says in ((dict(min_bucket_reso=32, buckets=False), "--min-bucket-reso 32: sets the buckets' sides, and "
                                                                "buckets are off; add --buckets"),
                     (dict(max_bucket_reso=100), "--max-bucket-reso 100: must be a multiple of 16 (the bucket step) "
                                                 "and at least the training size 64"),
                     (dict(min_bucket_reso=80), "--min-bucket-reso 80: must be a multiple of 16 (the bucket step) and "
                                                "at most the training size 64")):
        with pytest.raises(SdtuneError, match=f"^{re.escape(says)}$"):
            data.bucket_options(base, LoraSettings(data=str(tmp_path), out="o", **{"buckets": True, "bucket_step": 16,
                                                                                     **kw}))


def test_bucket_no_upscale_keeps_small_images_at_their_own_size(tmp_path, vae, base, recwarn):
    """kohya's bucket_no_upscale: an image of less than the training area (64 x 64) trains at its size rounded down
    to the step (16), not upscaled to a bucket; a larger one takes its bucket as before."""
    for w, h in ((40, 40), (50, 90), (128, 128)):
        solid(tmp_path / f"{w}x{h}.png", size=(w, h))
    ts = TrainingSet(scan_folder(tmp_path), vae, 64, seed=0, bucket_step=16, buckets=True, no_upscale=True)
    by_name = {e.path.stem: ts.bucket_of[i] for i, e in enumerate(ts.scan.examples)}
    assert by_name == {"40x40": (32, 32), "50x90": (48, 80), "128x128": (64, 64)}
    assert {tuple(ts.batch(n, 1).latents.shape[-2:]) for n in range(3)} == {(8, 8), (20, 12), (16, 16)}
    assert not any("upscaled" in str(w.message) for w in recwarn)
    with pytest.raises(SdtuneError, match="^--bucket-no-upscale: keeps small images at their own size in buckets, "
                                          "and buckets are off; add --buckets$"):
        data.bucket_options(base, LoraSettings(data=str(tmp_path), out="o", bucket_no_upscale=True))


def test_small_and_animated_images_are_said(tmp_path, vae):
    solid(tmp_path / "fine.png", size=(48, 48))  # more than half of 64: no note
    solid(tmp_path / "small.png", size=(32, 40))
    frames = [Image.new("RGB", (64, 64), c) for c in ((200, 0, 0), (0, 0, 200))]
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:])
    (tmp_path / "moving.txt").write_text("a red square")
    with pytest.warns(SdtuneWarning) as said:
        ts = TrainingSet(scan_folder(tmp_path), vae, 64, seed=0, bucket_step=16)
    lines = sorted(str(w.message) for w in said)
    assert lines == [f"{tmp_path / 'moving.gif'}: animated; only the first frame is trained on",
                     f"{tmp_path / 'small.png'}: 32x40, at most half the 64x64 it is trained at; it is upscaled, so "
                     f"it trains blurred (use larger images, or a smaller --resolution)"]
    first = ts.scan.examples.index(next(e for e in ts.scan.examples if e.path.name == "moving.gif"))
    assert ts.original_size[first] == (64, 64)



def test_a_small_image_is_said_once_where_the_training_images_stand_in_for_validation(tmp_path, recwarn):
    """With nothing held out the validation loss is measured on the training images, whose set is built again:
    its size notes were said twice."""
    (tmp_path / "data").mkdir()
    # (the validation set lists them in another order, so the two notes differed)
    for name, size in (("exif.jpg", (32, 64)), ("tiny8.png", (8, 8)), ("wide.png", (2000, 20))):
        solid(tmp_path / "data" / name, size=size)
    assert main(["train", "lora", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--steps", "1",
                 "--batch-size", "2", "--validation-split", "0", "--sample-every", "0", "--no-report",
                 "--no-progress"]) == 0  # (the built-in tiny model's preset: buckets)
    said = [str(w.message) for w in recwarn if "upscaled" in str(w.message)]
    assert len(said) == 1 and said[0].startswith(f"{tmp_path / 'data' / 'exif.jpg'} and 2 more: 32x64")


# ---------------------------------------------------------------- cache and batches

def test_latents_are_encoded_once_flips_included(tmp_path, vae, monkeypatch):
    for i, c in enumerate([(250, 0, 0), (0, 0, 250), (0, 250, 0)]):
        img = Image.new("RGB", (64, 64), (255, 255, 255))
        img.paste(c, (0, 0, 20, 64))  # asymmetric, so a flip changes the latent
        img.save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"image {i}")
    calls = []  # (pixels in, latents out) of every VAE call
    real = data.encode

    def spy(v, x):
        calls.append((x, real(v, x)))
        return calls[-1][1]

    monkeypatch.setattr(data, "encode", spy)
    ts = TrainingSet(scan_folder(tmp_path), vae, 64, seed=0, bucket_step=16, flip=True, encode_batch=8)
    assert [len(x) for x, _ in calls] == [3, 3]  # the 3 images, then their mirror images, once
    for n in range(8):
        ts.batch(n, 2)
    assert len(calls) == 2  # batches never run the VAE
    # the cache holds exactly what the VAE returned for these images and for their mirror images (compared
    # with the very same call's output: a fresh encode in another batch size may round differently)
    pixels = torch.stack([to_tensor(open_rgb(e.path)) for e in ts.scan.examples])
    (x, plain), (x_flipped, flipped) = calls
    assert torch.equal(x, pixels) and torch.equal(x_flipped, pixels.flip(-1))
    assert torch.equal(ts.latents[(64, 64)], plain) and torch.equal(ts.flipped[(64, 64)], flipped)
    assert not torch.allclose(ts.latents[(64, 64)][0], ts.flipped[(64, 64)][0])
    # the cache holds the distribution (mean, std), so every batch draws a fresh sample
    std = ts.latents[(64, 64)][0].chunk(2, 0)[1]
    assert std.min() > 0
    first, second = ts.batch(0, 3).latents, ts.batch(3, 3).latents  # epochs 0 and 1: the same 3 images
    assert not torch.allclose(first.sort(0).values, second.sort(0).values)


def test_random_crop_encodes_every_step_with_varying_crops(tmp_path, vae, monkeypatch):
    solid(tmp_path / "a.png", size=(128, 64))
    calls = []
    real = data.encode
    monkeypatch.setattr(data, "encode", lambda v, x: calls.append(x.clone()) or real(v, x))
    ts = TrainingSet(scan_folder(tmp_path), vae, 64, seed=0, bucket_step=16, crop="random")
    assert not calls and not ts.latents
    for n in range(4):
        ts.batch(n, 1)
    assert len(calls) == 4 and calls[0].shape == (1, 3, 64, 64)


def test_epochs_visit_every_entry_with_repeats(tmp_path, vae):
    solid(tmp_path / "a.png", caption="a")
    sub = tmp_path / "2_b"
    sub.mkdir()
    solid(sub / "b.png", caption=None)
    solid(sub / "c.png", caption=None)
    ts = TrainingSet(scan_folder(tmp_path), vae, 64, seed=3, bucket_step=16)
    assert len(ts) == 5
    assert ts.batches_per_epoch(1) == 5
    seen = Counter(ts.batch(n, 1).captions[0] for n in range(5))
    assert seen == {"a": 1, "b": 4}  # b.png and c.png, twice each
    assert ts.plan(0, 1) != ts.plan(1, 1) or ts.plan(1, 1) != ts.plan(2, 1)  # reshuffled per epoch


def test_batches_are_reproducible_and_slice_across_processes(tmp_path, vae):
    for i in range(5):
        solid(tmp_path / f"{i}.png", colour=(50 * i, 20, 200 - 30 * i), caption=f"tag{i}, x, y, z")
    make = lambda: TrainingSet(scan_folder(tmp_path), vae, 64, seed=7, bucket_step=16, flip=True,
                               captions=dict(shuffle=True, keep_tokens=1, dropout=0.2))
    one, again = make(), make()
    for n in range(7):
        whole = one.batch(n, 4)
        same = again.batch(n, 4)
        assert torch.equal(whole.latents, same.latents) and whole.captions == same.captions
        parts = [one.batch(n, 4, rank=r, world=2) for r in range(2)]
        assert torch.equal(torch.cat([p.latents for p in parts]), whole.latents)
        assert parts[0].captions + parts[1].captions == whole.captions
    assert not torch.equal(one.batch(0, 4).latents, one.batch(1, 4).latents)


def test_bad_resolution_is_a_clear_error(tmp_path, vae):
    solid(tmp_path / "a.png")
    with pytest.raises(SdtuneError, match="--resolution 60: must be a multiple of 16"):
        TrainingSet(scan_folder(tmp_path), vae, 60, seed=0, bucket_step=16)


def test_captions_from_metadata_jsonl_or_csv_and_upper_case_caption_files(tmp_path):
    """Hugging Face's imagefolder layout (diffusers' scripts): metadata.jsonl / metadata.csv with file_name and a
    caption column; a same-name caption file still wins. `A.PNG` + `A.TXT` is a pair."""
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("0", "1", "2"):
        solid(hf / f"{name}.png", caption=None)
    (hf / "2.txt").write_text("from the txt")
    (hf / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a red circle"}\n\n'
                                       '{"file_name": "1.png", "text": "a blue star"}\n'
                                       '{"file_name": "2.png", "text": "not used"}\n')
    assert {e.path.name: e.caption for e in scan_folder(hf).examples} == {
        "0.png": "a red circle", "1.png": "a blue star", "2.png": "from the txt"}
    (hf / "metadata.jsonl").unlink()
    (hf / "metadata.csv").write_text('file_name,caption\n0.png,"a red circle, striped"\n1.png,a blue star\n'
                                     '9.png,gone\n')
    scan = scan_folder(hf)
    assert scan.examples[0].caption == "a red circle, striped"
    assert scan.unused == [f"{hf}: 1 row(s) of its metadata name no image there and are not used (9.png)"]
    (hf / "metadata.csv").unlink()
    (hf / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "ok"}\n{"file_name": "1.png", oops}\n')
    with pytest.raises(SdtuneError, match=r"metadata.jsonl: line 2 is not JSON"):
        scan_folder(hf)
    (hf / "metadata.jsonl").write_text('{"file_name": "0.png", "label": 3}\n')
    with pytest.raises(SdtuneError, match=r"metadata.jsonl: no caption column \(text, caption, prompt\) for 0.png"):
        scan_folder(hf)

    upper = tmp_path / "upper"
    upper.mkdir()
    solid(upper / "A.PNG", caption=None)
    (upper / "A.TXT").write_text("a green square\nsecond line\n")
    scan = scan_folder(upper)
    assert scan.examples[0].caption == "a green square"
    assert scan.unused == [f"{upper}: 1 caption file(s) have more than one line; only the first is used, as kohya "
                           f"does (A.TXT); join the lines to keep them, or give --wildcards to draw one of them "
                           f"each time"]


def test_kohya_folders_sd_scripts_would_read_otherwise_are_said(tmp_path):
    for folder, name in (("5_red", "a"), ("0_unused", "b"), ("plain", "c")):
        (tmp_path / folder).mkdir()
        solid(tmp_path / folder / f"{name}.png", caption=None)
    scan = scan_folder(tmp_path, default_caption="x")
    assert {e.path.name: e.repeats for e in scan.examples} == {"a.png": 5, "c.png": 1}
    assert scan.unused == [
        f"{tmp_path / '0_unused'}: 0 repeats (its N_ prefix), so its images are not used",
        f"{tmp_path / 'plain'}: no N_ repeat prefix among kohya-style folders, so its images train once per epoch "
        f"(kohya sd-scripts skips such a folder)"]
    with pytest.raises(SdtuneError, match=r"nothere: --validation-dir is not a folder"):
        scan_folder(tmp_path / "nothere", option="--validation-dir")
    only_zero = tmp_path / "only-zero"  # said as such, not as "no images found"
    (only_zero / "0_held").mkdir(parents=True)
    solid(only_zero / "0_held" / "d.png", caption=None)
    with pytest.raises(SdtuneError, match=r"only-zero: its 1 image\(s\) are all in folders of 0 repeats \(0_held\); "
                                          r"give a folder a count of repeats, e.g. 10_held$"):
        scan_folder(only_zero, default_caption="x")


def test_a_vae_that_asks_for_it_encodes_in_fp32_and_keeps_its_fp16_weights():
    """SDXL's VAE (force_upcast) overflows in fp16: it encodes in fp32, as diffusers does, and stays fp16."""
    vae = tiny.build(seed=0)["vae"].eval().half()
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    weights = {k: v.clone() for k, v in vae.state_dict().items()}
    vae.register_to_config(force_upcast=False)
    plain = data.encode(vae, pixels)  # fp16 all the way
    vae.register_to_config(force_upcast=True)  # diffusers' default, which SDXL's config states
    upcast = data.encode(vae, pixels)
    reference = tiny.build(seed=0)["vae"].eval().half().float()  # the same fp16 weights, in fp32
    with torch.no_grad():
        want = data.encode(reference, pixels)
    assert torch.equal(upcast, want) and not torch.equal(plain, want)
    assert next(vae.parameters()).dtype == torch.float16
    assert all(torch.equal(v, weights[k]) for k, v in vae.state_dict().items())


def test_a_caption_longer_than_the_text_window_is_said(base, tmp_path, capfd):
    """Training reads 75 tokens of a caption: a longer one is named (the rest was dropped without a word)."""
    for name, caption in (("short", "a red star"), ("long", "a red star " * 40), ("longer", "a blue circle " * 60)):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(caption)
    scan = scan_folder(tmp_path)
    with pytest.warns(SdtuneWarning) as caught:
        data._note_long_captions(base.tokenizer, scan)
    assert [str(w.message) for w in caught] == [
        f"{tmp_path / 'long.png'} and 1 more: caption longer than the 75 tokens training reads; the rest is not "
        f"learned (shorten it, or put what matters first, or --max-token-length 150 or 225)"]
    assert capfd.readouterr().err == ""  # not transformers' own line about long sequences too
    with pytest.warns(SdtuneWarning) as caught:  # --max-token-length 150: two chunks, so only the longer one
        data._note_long_captions(base.tokenizer, scan, chunks=2)
    assert [str(w.message) for w in caught] == [
        f"{tmp_path / 'longer.png'}: caption longer than the 150 tokens training reads; the rest is not "
        f"learned (shorten it, or put what matters first, or --max-token-length 225)"]


def test_a_run_with_separators_and_a_prefix_trains_and_samples_the_captions_they_make(base, tmp_path):
    """The separators never reach the text encoder and the prefix/suffix are on every caption, in training, the
    validation loss and the sample prompts: the run equals one on caption files that hold the result as such."""
    for name, caption in (("marked", "outline ||| a red;;;circle ||| white"), ("plain", "sks outline, a red, circle, "
                                                                                   "white, film")):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(4):
            solid(folder / f"{i}.png", colour=(60 * i, 30, 200), caption=caption)
    kw = dict(save_every=0, sample_every=4, sample_images=1, sample_steps=1)
    marked = train_lora(base, small_runs.settings(tmp_path / "marked", tmp_path / "a", keep_tokens_separator="|||",
                                       secondary_separator=";;;", caption_prefix="sks", caption_suffix=", film", **kw))
    plain = train_lora(base, small_runs.settings(tmp_path / "plain", tmp_path / "b", **kw))
    a, b = small_runs.factors(marked), small_runs.factors(plain)
    assert all(torch.equal(x, y) for k in a for x, y in zip(a[k], b[k]))
    for step in ("step-000000.png", "step-000004.png"):
        assert np.array_equal(*(np.asarray(Image.open(tmp_path / out / "samples" / step)) for out in ("a", "b")))
    meta = read_metadata(marked)
    assert (meta["ss_keep_tokens_separator"], meta["ss_caption_prefix"]) == ("|||", "sks")
    assert "ss_caption_prefix" not in read_metadata(plain)


def test_wildcards_draw_a_line_and_an_option_each_time_and_samples_read_the_first(tmp_path, vae):
    """kohya's enable_wildcard: a caption file's lines are alternatives and {a|b|c} takes one option; without the
    flag only the first line is read, and a note says so and names the flag."""
    solid(tmp_path / "a.png", caption="a {red|blue|green} circle\nsks, circle, {plain|flat} colour")
    with pytest.warns(SdtuneWarning, match="have more than one line; only the first is used.*--wildcards"):
        report_skipped(scan_folder(tmp_path))
    assert scan_folder(tmp_path).examples[0].caption == "a {red|blue|green} circle"
    scan = scan_folder(tmp_path, all_lines=True)
    assert not scan.unused and scan.examples[0].caption.count("\n") == 1
    ts = TrainingSet(scan, vae, 64, seed=0, bucket_step=16, captions=dict(wildcards=True))
    assert ts.captions_vary
    drawn = {ts.batch(n, 1).captions[0] for n in range(200)}
    assert drawn == {"a red circle", "a blue circle", "a green circle", "sks, circle, plain colour",
                     "sks, circle, flat colour"}
    settings = LoraSettings(data=str(tmp_path), out="o", wildcards=True, caption_prefix="x")
    assert captions.steady_caption(scan.examples[0].caption, settings) == "x a red circle"
    plain = TrainingSet(scan_folder(tmp_path), vae, 64, seed=0, bucket_step=16, captions=dict(wildcards=True))
    assert not TrainingSet(scan_folder(tmp_path), vae, 64, seed=0, bucket_step=16).captions_vary
    assert plain.captions_vary  # {red|blue|green} on the first line alone still varies
