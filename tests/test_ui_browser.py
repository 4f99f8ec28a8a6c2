"""`sdtune ui` in a real browser: headless Chromium drives the page of a server started as a user would start it.

The browser tests are skipped when Chromium, chromedriver or Selenium is missing; the last test (--listen and
--auth) needs only the server. The tests share one server and one browser and run
in file order (generate, compare, LoRA files, train, gallery, refusals). ``SDTUNE_UI_SCREENSHOTS=docs/ui``
saves the screenshots there (the README's); by default they go to a temporary folder and are only checked.
"""

import io
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdtune.generate import parse_infotext, read_infotext, save_png
from sdtune.lora.formats import save_lora
from sdtune.lora.neutral import Adapter, Lora
from sdtune.models import load_base
from sdtune.tiny import world

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
except ImportError:
    webdriver = None

needs_browser = pytest.mark.skipif(
    webdriver is None or not CHROMIUM or not CHROMEDRIVER,
    reason="browser tests need selenium (pip install selenium) and headless Chromium with its driver "
           "(apt-get install chromium chromium-driver)")

MAX_SHOT = 200_000  # bytes per README screenshot
# the README's screenshots are made with the trained tiny model (SDTUNE_UI_MODEL=tiny); tests use the random one
MODEL = os.environ.get("SDTUNE_UI_MODEL", "tiny-random")
STEPS = 10  # enough for the trained tiny model to draw a recognisable shape


# ---------------------------------------------------------------------------------------------- fixtures

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_lora() -> Lora:
    base = load_base("tiny-random")
    g = torch.Generator().manual_seed(1)
    lora = Lora(format="test")
    for path, m in base.unet.named_modules():
        if isinstance(m, torch.nn.Linear) and path.endswith(("attn1.to_q", "attn2.to_k")):
            out_f, in_f = m.weight.shape
            lora.modules["unet"][path] = Adapter("lora", {"down": torch.randn(2, in_f, generator=g) * 0.3,
                                                          "up": torch.randn(out_f, 2, generator=g)}, 2.0)
    return lora


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-browser")
    out, loras = root / "out", root / "loras"
    loras.mkdir()
    save_lora(_tiny_lora(), loras / "tinystyle.safetensors")
    (root / "secret.safetensors").write_bytes((loras / "tinystyle.safetensors").read_bytes())
    (loras / "evil.safetensors").symlink_to(root / "secret.safetensors")  # a link out of the LoRA folder
    world.write_dataset(out / "datasets" / "stars", world.concept_scenes(4, seed=3, shape="star"))
    proc, url = _start(root / "server.log", "--model", MODEL, "--out", str(out), "--lora-dir", str(loras),
                       "--max-upload-mb", "2")
    _wait_up(proc, url, root / "server.log")
    yield {"url": url, "root": root, "out": out, "loras": loras, "proc": proc, "log": root / "server.log"}
    _stop(proc)


def _sigint_as_in_a_terminal() -> None:
    """Ctrl+C's default action in the server, as a terminal gives it: tests started in the background by a
    non-interactive shell (``pytest &`` in a script) inherit SIGINT ignored, and the server would not stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(log: Path, *args: str):
    """`sdtune ui ARGS --port FREE` in a process group of its own, output to ``log``; (process, local URL)."""
    port = _free_port()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "sdtune.cli", "ui", *args, "--port", str(port)], stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_sigint_as_in_a_terminal)
    return proc, f"http://127.0.0.1:{port}"


def _wait_up(proc, url: str, log: Path) -> None:
    """Until the server answers and has printed its address (it prints once it serves, so after the first)."""
    end = time.time() + 120
    while time.time() < end:
        assert proc.poll() is None, log.read_text()
        try:
            urllib.request.urlopen(url, timeout=2)
        except urllib.error.HTTPError:  # answering, if only to say "log in first"
            pass
        except OSError:
            time.sleep(0.5)
            continue
        if "sdtune ui: http" in log.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"the server did not come up: {log.read_text()}")


def _stop(proc) -> None:
    os.killpg(proc.pid, signal.SIGTERM)  # the server stops its training jobs on the way out
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("SDTUNE_UI_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser(server):
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    d.get(server["url"])
    _wait(lambda: d.find_elements(By.CSS_SELECTOR, "#gen-prompt textarea"), 30)
    yield d
    d.quit()


# ---------------------------------------------------------------------------------------------- page helpers

def _wait(cond, timeout=60.0, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _frame_heading(d, selector) -> str:
    """The h1 of the page in the frame ``selector`` ("" while there is none)."""
    frames = d.find_elements(By.CSS_SELECTOR, selector)
    if not frames:
        return ""
    try:
        d.switch_to.frame(frames[0])
        return " ".join(h.text for h in d.find_elements(By.TAG_NAME, "h1"))
    except WebDriverException:  # the frame was replaced while it was read
        return ""
    finally:
        d.switch_to.default_content()


def _tab(d, tab_id):
    def clicked():  # the page's loading overlay takes the click until the app has started (slow on a loaded CPU)
        try:
            d.find_element(By.CSS_SELECTOR, f"button[role=tab][data-tab-id='{tab_id}']").click()
            return True
        except WebDriverException:
            return False

    _wait(clicked, 60, f"the {tab_id} tab to take a click")
    time.sleep(0.5)


def _field(d, elem_id):
    """The input of a component, waited for: on a loaded machine the page may still be rendering its parts."""
    css = f"#{elem_id} textarea, #{elem_id} input:not([type=range])"
    return _wait(lambda: d.find_elements(By.CSS_SELECTOR, css), 30, f"#{elem_id}'s input")[0]


def _type(d, elem_id, text, enter=False):
    el = _field(d, elem_id)
    el.send_keys(Keys.CONTROL, "a")
    el.send_keys(Keys.DELETE)
    el.send_keys(str(text) + (Keys.ENTER if enter else ""))
    el.send_keys(Keys.TAB)  # blur: numbers and sliders take their value then


def _pick(d, elem_id, option):
    _field(d, elem_id).click()
    _wait(lambda: d.find_elements(By.CSS_SELECTOR, f"li[role=option][aria-label='{option}']"), 10, option)[0].click()
    time.sleep(0.3)


def _open(d, elem_id):
    """Open a closed accordion by its label."""
    d.find_element(By.CSS_SELECTOR, f"#{elem_id} .label-wrap").click()
    time.sleep(0.5)


def _value(d, elem_id):
    return _field(d, elem_id).get_attribute("value")


def _text(d, elem_id):
    """What an element shows: a text box's value, else its text."""
    boxes = d.find_elements(By.CSS_SELECTOR, f"#{elem_id} textarea")
    return boxes[0].get_attribute("value") if boxes else d.find_element(By.ID, elem_id).text


def _wait_text(d, elem_id, pattern, timeout=60.0):
    try:
        return _wait(lambda: re.search(pattern, _text(d, elem_id)), timeout, f"{pattern!r} in #{elem_id}")
    except AssertionError as e:
        raise AssertionError(f"{e}; it shows {_text(d, elem_id)!r}") from None


def _shot(d, shots, name):
    """A screenshot of the page's top (up to 1400 px) as a 256-colour PNG (what the README shows)."""
    d.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)  # close an open dropdown list
    d.execute_script("window.scrollTo(0, 0)")
    height = d.execute_script("return document.documentElement.scrollHeight")
    d.set_window_size(1280, min(max(height, 800), 1400))
    time.sleep(0.7)
    im = Image.open(io.BytesIO(d.get_screenshot_as_png())).convert("RGB")
    d.set_window_size(1280, 1000)
    path = shots / f"{name}.png"
    im.quantize(256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
    assert path.stat().st_size < MAX_SHOT
    return path


# ---------------------------------------------------------------------------------------------- the tests

@needs_browser
def test_generate_with_a_lora_at_weight_0_8(server, browser, shots):
    d = browser
    _type(d, "gen-prompt", "a red star on a white background")
    _type(d, "gen-steps", STEPS)
    _type(d, "gen-seed", 7)
    lora_options = _field(d, "gen-lora-0")
    lora_options.click()
    offered = [li.get_attribute("aria-label") for li in d.find_elements(By.CSS_SELECTOR, "li[role=option]")]
    assert "tinystyle" in offered and "evil" not in offered  # the symlink out of the folder is not offered
    _pick(d, "gen-lora-0", "tinystyle")
    _type(d, "gen-lora-0-w", 0.8)
    d.find_element(By.ID, "gen-go").click()
    _wait_text(d, "gen-status", rf"1 image\(s\) by {MODEL} in")  # the model named: another page may switch it
    params = parse_infotext(_value(d, "gen-params"))
    assert params["prompt"] == "a red star on a white background <lora:tinystyle:0.8>"
    assert params["Lora weights"] == "tinystyle=0.8"
    assert params["Seed"] == "7" and params["Steps"] == str(STEPS)
    (png,) = sorted((server["out"] / "generate").glob("*.png"))
    assert parse_infotext(read_infotext(png)) == params  # the file says what the page says
    _wait(lambda: d.find_elements(By.CSS_SELECTOR, "#gen-gallery img"), 10, "the image")
    # the layout shows what it holds: the one image whole inside its gallery (a fixed height showed it cut, behind
    # a scroll bar), each size slider inside its box (beside the seed they were pushed out), the pickers labelled
    inside = """const [a, b] = [arguments[0], arguments[1]].map(e => e.getBoundingClientRect());
                return a.left >= b.left - 1 && a.right <= b.right + 1 && a.top >= b.top - 1 && a.bottom <= b.bottom + 1"""
    time.sleep(0.5)  # the image settles to its size
    assert d.execute_script(inside, d.find_element(By.CSS_SELECTOR, "#gen-gallery img"),
                            d.find_element(By.ID, "gen-gallery"))
    for slider in ("gen-width", "gen-height"):
        assert d.execute_script(inside, d.find_element(By.CSS_SELECTOR, f"#{slider} input[type=range]"),
                                d.find_element(By.ID, slider))
    assert d.find_element(By.ID, "gen-lora-0").text.startswith("LoRA 1")
    _shot(d, shots, "generate")


@needs_browser
def test_block_weights_of_a_picked_lora_go_to_the_api(server, browser):
    d = browser
    assert _value(d, "gen-lora-0") == "tinystyle"
    _type(d, "gen-lora-0-blocks", "1,0,1")
    d.find_element(By.ID, "gen-go").click()  # not a vector of the tiny model's layout: the API's own refusal
    _wait_text(d, "gen-status", re.escape("lbw=1,0,1: the built-in tiny model takes 8 or 14"), 30)
    _type(d, "gen-lora-0-blocks", "INALL")
    d.find_element(By.ID, "gen-go").click()
    _wait_text(d, "gen-status", r"1 image\(s\) by \S+ in")
    assert (parse_infotext(_value(d, "gen-params"))["prompt"]
            == "a red star on a white background <lora:tinystyle:0.8:lbw=INALL>")


@needs_browser
def test_generation_can_be_cancelled_and_the_model_switched(server, browser):
    d = browser
    _type(d, "gen-prompt", "a green square")
    _type(d, "gen-steps", 150)
    before = sorted((server["out"] / "generate").glob("*.png"))
    d.find_element(By.ID, "gen-go").click()
    _wait(lambda: re.search(r"denoising", d.find_element(By.ID, "gen-gallery").text), 60, "the step progress")
    d.find_element(By.ID, "gen-cancel").click()
    _wait_text(d, "gen-status", r"generation cancelled at step \d+ of 150; nothing was saved", 60)
    assert sorted((server["out"] / "generate").glob("*.png")) == before
    d.find_element(By.ID, "gen-cancel").click()  # nothing running: said on the page (the server log stays quiet)
    _wait_text(d, "gen-status", "no generation to cancel", 30)
    _type(d, "gen-steps", STEPS)
    other = "tiny-xl" if MODEL == "tiny" else "tiny"  # another one: picking the one in use changes nothing
    _pick(d, "model", other)
    _wait_text(d, "model-status", f"base model: {other} ", 30)
    _pick(d, "model", MODEL)
    _wait_text(d, "model-status", f"base model: {MODEL} ", 30)


@needs_browser
def test_reuse_the_settings_of_a_dropped_a1111_png(server, browser, tmp_path):
    d = browser
    png = save_png(Image.new("RGB", (64, 64), "white"), tmp_path / "from-a1111.png",
                   "a blue circle, <lora:tinystyle:0.5>\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a, "
                   "CFG scale: 6, Seed: 1234, Size: 64x64, Model hash: abc, Model: sd15, Clip skip: 2, "
                   "Hires upscale: 2")
    d.find_element(By.CSS_SELECTOR, "#gen-drop input[type=file]").send_keys(str(png))
    # what the form cannot apply is named, not silently dropped
    _wait_text(d, "gen-status", "settings taken from the dropped image; not applied here: Hires upscale", 30)
    assert _value(d, "gen-prompt") == "a blue circle, <lora:tinystyle:0.5>"
    assert _value(d, "gen-negative") == "blurry"
    assert (_value(d, "gen-seed"), _value(d, "gen-steps"), _value(d, "gen-cfg")) == ("1234", "3", "6")
    assert _value(d, "gen-clip-skip") == "2"
    assert _value(d, "gen-sampler") == "Euler a" and _value(d, "gen-lora-0") == ""  # A1111's name for euler_a
    d.find_element(By.ID, "gen-go").click()  # the typed tag works like the picker
    _wait_text(d, "gen-status", r"1 image\(s\) by \S+ in")
    params = parse_infotext(_value(d, "gen-params"))
    assert params["Lora weights"] == "tinystyle=0.5" and params["Sampler"] == "Euler a"
    assert params["Clip skip"] == "2"  # the dropped image's clip skip drew this one


@needs_browser
def test_compare_makes_a_2x2_grid_with_downloadable_parts(server, browser, shots):
    d = browser
    _tab(d, "compare")
    _type(d, "cmp-prompt", "a red star on a white background")
    _type(d, "cmp-x", "seed=1,2")
    _type(d, "cmp-y", "weight=0,0.8")
    _pick(d, "cmp-loras", "tinystyle")
    _type(d, "cmp-steps", STEPS)
    d.find_element(By.ID, "cmp-go").click()
    _wait_text(d, "cmp-status", f"grid and 5 parts by {MODEL} in", 120)
    (grid,) = (server["out"] / "grids").glob("*/xy.png")
    assert Image.open(grid).size[0] > 2 * 128
    assert "Y Type: LoRA weight (tinystyle)" in read_infotext(grid)
    links = _wait(lambda: d.find_elements(By.CSS_SELECTOR, "#cmp-files a[href]"), 10, "download links")
    hrefs = {Path(urllib.parse.unquote(a.get_attribute("href"))).name: a.get_attribute("href") for a in links}
    assert {"xy.png", "xy.json", "xy-00-00.png", "xy-01-01.png"} <= set(hrefs), hrefs
    href = hrefs["xy.png"]
    with urllib.request.urlopen(href) as r:  # the download is the grid itself, parameters included
        body = r.read()
    assert body == grid.read_bytes()
    _shot(d, shots, "compare")


@needs_browser
def test_lora_files_inspect_and_refuse_a_pickle_with_code(server, browser, shots, tmp_path):
    d = browser
    _tab(d, "loras")
    _pick(d, "lora-name", "tinystyle")
    d.find_element(By.ID, "lora-inspect").click()
    _wait_text(d, "lora-status", "inspected tinystyle", 30)
    info = _value(d, "lora-info")
    assert re.search(r"ranks\s+2", info) and "format" in info
    _shot(d, shots, "loras")
    d.find_element(By.XPATH, "//*[@id='lora-to']//label[contains(., 'diffusers')]").click()
    _type(d, "lora-conv-name", "tinystyle-diffusers")
    d.find_element(By.ID, "lora-convert").click()
    _wait_text(d, "lora-status", "written: .*tinystyle-diffusers.safetensors", 30)
    assert "lora_unet_" not in (server["loras"] / "tinystyle-diffusers.safetensors").read_bytes()[:4000].decode(
        "latin-1")  # diffusers key names, not kohya's
    _type(d, "lora-merge-specs", "tinystyle:0.5")
    _type(d, "lora-merge-name", "star-merged")
    d.find_element(By.ID, "lora-merge").click()
    _wait_text(d, "lora-status", "written: .*star-merged.safetensors", 60)
    assert (server["out"] / "merged" / "star-merged.safetensors").is_file()
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"

    class Evil:  # unpickling it would run a shell command; the safe loader must refuse it
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil.write_bytes(pickle.dumps({"lora_unet_x.lora_down.weight": Evil()}, protocol=2))
    d.find_element(By.CSS_SELECTOR, "#lora-upload input[type=file]").send_keys(str(evil))
    time.sleep(1.5)
    d.find_element(By.ID, "lora-inspect").click()
    _wait_text(d, "lora-status", "refuses to unpickle", 30)
    assert not marker.exists()
    assert d.find_elements(By.CSS_SELECTOR, "#lora-upload .file-preview")  # the upload, shown
    _pick(d, "lora-name", "tinystyle")  # a file picked after an upload: the upload is dropped, Inspect takes the pick
    _wait(lambda: not d.find_elements(By.CSS_SELECTOR, "#lora-upload .file-preview"), 10, "the upload dropped")
    d.find_element(By.ID, "lora-inspect").click()
    _wait_text(d, "lora-status", "inspected tinystyle", 30)


def _progress(d):
    m = re.search(r"step (\d+) of (\d+)", _text(d, "train-progress"))
    return int(m.group(1)) if m else None


@needs_browser
def test_train_progress_stop_resume_and_a_queue(server, browser, shots, tmp_path):
    d = browser
    _tab(d, "train")
    _type(d, "train-name", "run1")
    _type(d, "train-dataset", "stars", enter=True)
    _type(d, "train-steps", 400)  # still running when the queue below is filled; stopped there
    _type(d, "train-save_every", 3)
    _type(d, "train-rank", 4)
    _type(d, "train-sample_every", 3)
    _type(d, "train-sample_prompts", "a red star on a white background")
    d.find_element(By.ID, "train-start").click()
    _wait_text(d, "train-status", "job run1 queued", 20)
    first = _wait(lambda: _progress(d), 240, "progress")
    _wait(lambda: (_progress(d) or 0) >= max(first + 1, 4), 240, "progress to move on")  # past the save at 3
    _wait(lambda: d.find_elements(By.CSS_SELECTOR, "#train-samples img"), 120, "the sample grid of step 3")
    folder = server["out"] / "train" / "run1"
    d.find_element(By.ID, "train-stop").click()
    _wait_text(d, "train-progress", r"\(lora\): stopped", 30)
    assert (folder / "resume.pt").is_file()
    d.find_element(By.ID, "train-resume").click()
    _wait_text(d, "train-progress", r"\(lora\): running", 30)
    run2 = lambda: (folder / "train.log").read_text().split("--- run 2")[-1]  # noqa: E731
    _wait(lambda: re.search(r" (\d+)/400 ", run2()), 240, "the resumed run's progress")
    resumed_at = int(re.search(r" (\d+)/400 ", run2()).group(1))
    assert resumed_at >= 3  # it went on from the save, not from 0
    d.refresh()  # a reloaded page shows the running job (it showed none)
    _tab(d, "train")
    _wait_text(d, "train-progress", r"run1 \(lora\): running", 30)
    _type(d, "train-dataset", "stars", enter=True)  # the reloaded form starts from the preset again

    for name in ("q1", "q2"):  # two more jobs wait for the running one
        _type(d, "train-name", name)
        _type(d, "train-steps", 2)
        _type(d, "train-save_every", 0)
        _type(d, "train-sample_every", 0)
        d.find_element(By.ID, "train-start").click()
        _wait_text(d, "train-status", f"job {name} queued", 20)
    _wait_text(d, "train-jobs", r"q2\s+lora\s+queued", 10)
    assert re.search(r"q1\s+lora\s+queued", _text(d, "train-jobs"))
    _pick(d, "train-job", "run1")
    _wait_text(d, "train-progress", r"\(lora\): running", 10)
    _shot(d, shots, "train")
    d.find_element(By.ID, "train-stop").click()
    _wait_text(d, "train-jobs", r"q2\s+lora\s+done", 600)
    assert re.search(r"q1\s+lora\s+done", _text(d, "train-jobs"))
    assert re.search(r"run1\s+lora\s+stopped", _text(d, "train-jobs"))
    for name in ("q1", "q2"):
        assert (server["out"] / "train" / name / "lora.safetensors").is_file()

    # a queue file (jobs and sweeps): one in the output folder runs as a job with its page; a bad upload is
    # refused in one line
    (server["out"] / "sweep.toml").write_text('[defaults]\ndata = "datasets/stars"\nsteps = 2\nreport = false\n'
                                              '[[job]]\nkind = "lora"\nrank = 2\nsweep = {lr = [1e-3, 5e-4]}\n')
    _open(d, "train-queue")
    _type(d, "train-name", "sweep")
    _type(d, "train-queue-path", "sweep.toml")
    d.find_element(By.ID, "train-queue-go").click()
    _wait_text(d, "train-status", "job sweep queued", 20)
    _wait_text(d, "train-jobs", r"sweep\s+queue\s+done", 300)
    _wait_text(d, "train-progress", r"\(queue\): done.*run 2 of 2: lora-1-lr-0\.0005.*step 2 of 2", 10)
    frame = _wait(lambda: d.find_elements(By.CSS_SELECTOR, "#train-report iframe"), 30, "the queue's page")[0]
    d.switch_to.frame(frame)
    try:
        assert re.search(r"run\s+lora-1-lr-0.001\s+lora-1-lr-0.0005", d.find_element(By.TAG_NAME, "table").text)
    finally:
        d.switch_to.default_content()
    bad = tmp_path / "bad.toml"
    bad.write_text("[[job]]\nkind = 'lora'\nrnak = 2\n")
    d.find_element(By.CSS_SELECTOR, "#train-queue-file input[type=file]").send_keys(str(bad))
    time.sleep(1.5)
    d.find_element(By.ID, "train-queue-go").click()
    _wait_text(d, "train-status", re.escape("bad.toml: job 1: unknown key 'rnak'; did you mean 'rank'?"), 20)
    assert "\n" not in _text(d, "train-status").strip()
    _pick(d, "train-job", "q2")
    _wait_text(d, "train-progress", r"\(lora\): done.*step 2 of 2", 10)
    # its report, embedded: the page's images come through the file route of the output folder
    # the page shown before (the queue's) stays in place until the job's report replaces it
    _wait(lambda: "did it work?" in _frame_heading(d, "#train-report iframe"), 30, "the job's report")
    d.switch_to.frame(d.find_element(By.CSS_SELECTOR, "#train-report iframe"))
    try:
        loaded = "return [...document.images].map(i => i.complete && i.naturalWidth > 0)"
        assert _wait(lambda: (lambda ok: ok and all(ok))(d.execute_script(loaded)), 20, "the report's images")
    finally:
        d.switch_to.default_content()
    d.find_element(By.ID, "train-compare").click()
    _wait_text(d, "train-status", "jobs compared in", 20)
    frame = _wait(lambda: d.find_elements(By.CSS_SELECTOR, "#train-comparison iframe"), 20)[0]
    d.switch_to.frame(frame)
    try:
        assert re.search(r"run\s+run1\s+q1\s+q2", d.find_element(By.TAG_NAME, "table").text)
    finally:
        d.switch_to.default_content()
    d.find_element(By.ID, "train-use").click()  # the result goes to the LoRA folder, named after the job
    _wait_text(d, "train-status", re.escape("in the LoRA folder as q2; put <lora:q2:1> in a prompt"), 10)
    assert (server["loras"] / "q2.safetensors").is_file()


@needs_browser
def test_gallery_search_and_send_to_generate(server, browser, shots):
    d = browser
    _tab(d, "gallery")
    _type(d, "gal-query", "blue circle", enter=True)
    _wait_text(d, "gal-status", r"^1 image\(s\)", 20)
    _wait(lambda: d.find_elements(By.CSS_SELECTOR, "#gal-images button img, #gal-images img"), 10)[0].click()
    _wait(lambda: "blue circle" in (_value(d, "gal-params") or ""), 10, "the parameters")
    d.find_element(By.ID, "gal-send").click()
    _wait(lambda: d.find_element(By.CSS_SELECTOR, "button[role=tab][data-tab-id='generate']")
          .get_attribute("aria-selected") == "true", 10, "the Generate tab")
    _wait(lambda: _value(d, "gen-prompt") == "a blue circle, <lora:tinystyle:0.5>", 10, "the prompt")
    _tab(d, "gallery")
    _type(d, "gal-query", "", enter=True)
    _wait(lambda: len(d.find_elements(By.CSS_SELECTOR, "#gal-images img")) >= 4, 20, "thumbnails")
    for close in d.find_elements(By.CSS_SELECTOR, "#gal-images button[aria-label='Close']"):
        close.click()  # back from the large view of the picked image to the thumbnails
    d.execute_script("document.querySelectorAll('#gal-images, #gal-images *').forEach(e => e.scrollTop = 0)")
    _shot(d, shots, "gallery")


@needs_browser
def test_path_traversal_is_refused(server, browser):
    d = browser
    _tab(d, "generate")
    for prompt, says in (("a star, <lora:../secret:1>", "'..' leaves the LoRA folder"),
                         ("a star, <lora:evil:1>", "leads outside the LoRA folder"),
                         ("a star, <lora:/etc/passwd:1>", "absolute paths are not allowed")):
        _type(d, "gen-prompt", prompt)
        d.find_element(By.ID, "gen-go").click()
        _wait_text(d, "gen-status", re.escape(says), 30)
    _tab(d, "train")
    _type(d, "train-name", "escape")
    _type(d, "train-dataset", "../../../etc", enter=True)
    d.find_element(By.ID, "train-start").click()
    _wait_text(d, "train-status", "refused: '..' leaves the output folder", 20)
    assert not (server["out"] / "train" / "escape").exists()
    # the file route serves the output folder, nothing else
    for path in ("/etc/passwd", str(server["loras"] / "tinystyle.safetensors"),
                 str(server["out"]) + "/../secret.safetensors"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{server['url']}/gradio_api/file={path}")
        assert e.value.code in (403, 404)


def test_values_sent_straight_to_the_api_are_refused_to_the_caller_alone(server):
    """Gradio checks a value sent to its HTTP API before any handler runs (a slider's range, a menu's choices,
    text for a number) and printed each refusal's traceback on the server's terminal; now the caller alone hears
    it. A text or a number left out (null) is the field's own, as the page would send it."""
    from gradio_client import Client

    client = Client(server["url"] + "/", verbose=False)
    fields = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/run"]["parameters"]
    form = [f.get("parameter_default") for f in fields]  # Prompt, Negative prompt, Sampler, Steps, ..., Images
    form[0], form[3] = "a star", 2
    log_before = server["log"].read_text()
    for at, value, says in ((3, 100000, "Value 100000 is greater than maximum value 150"),
                            (3, "many", "Steps: "), (2, "nonsense", "Value: nonsense is not in the list of choices"),
                            (9, -5, "Value -5 is less than minimum value 1")):
        sent = list(form)
        sent[at] = value
        with pytest.raises(Exception, match=says):
            client.predict(*sent, api_name="/run")
    left_out = [None] * len(form)
    left_out[0], left_out[2], left_out[3] = "a star", "ddim", 2  # the rest as the fields' own values
    gallery, _, status = client.predict(*left_out, api_name="/run")
    assert status.startswith("1 image(s) by ") and len(gallery) == 1, status
    assert server["log"].read_text() == log_before  # nothing on the server's terminal


@needs_browser
def test_the_server_said_nothing_but_its_address(server):
    lines = [ln for ln in server["log"].read_text().splitlines() if ln.strip()]
    assert lines[0].startswith("sdtune ui: http://127.0.0.1:") and len(lines) == 1, lines


def test_listen_warns_without_auth_and_auth_asks_for_the_password(tmp_path):
    open_log, locked_log = tmp_path / "open.log", tmp_path / "locked.log"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    opened, open_url = _start(open_log, "--model", "tiny-random", "--out", str(tmp_path / "a"), "--listen")
    locked, locked_url = _start(locked_log, "--model", "tiny-random", "--out", str(tmp_path / "b"),
                                "--auth", "me:s3cret-pass")
    try:
        _wait_up(opened, open_url, open_log)
        _wait_up(locked, locked_url, locked_log)
        lines = open_log.read_text().splitlines()
        assert lines[0].startswith("sdtune: warning: --listen without --auth: anyone who can reach this machine")
        assert lines[1].startswith("sdtune ui: http://0.0.0.0:")
        with urllib.request.urlopen(f"{open_url}/config") as r:
            assert r.status == 200
        assert locked_log.read_text().startswith("sdtune ui: http://127.0.0.1:")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{locked_url}/config")
        assert e.value.code == 401
        login = lambda pw: urllib.request.urlopen(urllib.request.Request(  # noqa: E731
            f"{locked_url}/login", data=urllib.parse.urlencode({"username": "me", "password": pw}).encode()))
        with pytest.raises(urllib.error.HTTPError):
            login("wrong")
        with login("s3cret-pass") as r:
            assert r.status == 200
        # stopped by Ctrl+C (SIGINT) or kill (SIGTERM): the server says only that (Gradio printed "Closing server")
        os.killpg(locked.pid, signal.SIGINT)
        assert locked.wait(timeout=30) == 130
        assert locked_log.read_text().splitlines()[1:] == ["sdtune: interrupted"]
        _stop(opened)
        assert opened.returncode == 0 and len(open_log.read_text().splitlines()) == 2
    finally:
        for proc in (opened, locked):
            if proc.poll() is None:
                _stop(proc)


NETWORK = "train-section-the-network-LoRA-and-LyCORIS"


@needs_browser
def test_train_form_follows_the_kind_the_preset_and_the_model_after_a_reload(server, browser, tmp_path):
    """The form shows what a run starts from, as `sdtune train` does: the model's preset for the kind picked
    (the TI fields appear for TI), a preset picked by name, a settings file uploaded (a kohya config); a reloaded
    page shows the model in use."""
    d = browser
    _tab(d, "train")
    d.find_element(By.CSS_SELECTOR, "#train-kind input[value=ti]").click()
    token = _wait(lambda: [e for e in d.find_elements(By.CSS_SELECTOR, "#train-token input, #train-token textarea")
                           if e.is_displayed()], 30, "the TI form's token field")[0]
    assert token.get_attribute("value") == ""
    _wait(lambda: _value(d, "train-lr") == "0.005", 10, "the TI preset's lr")  # tiny-random: the tiny preset
    assert not [e for e in d.find_elements(By.ID, "train-rank") if e.is_displayed()]  # a LoRA setting: hidden
    _open(d, "train-advanced")  # in --help's sections; TI has no network section
    assert d.find_element(By.ID, "train-section-captions").is_displayed()
    assert not [e for e in d.find_elements(By.ID, NETWORK) if e.is_displayed()]  # (Gradio leaves it out)
    d.find_element(By.CSS_SELECTOR, "#train-kind input[value=lora]").click()
    _wait(lambda: _value(d, "train-lr") == "0.001" and _value(d, "train-batch_size") == "8", 10, "the LoRA preset")
    _wait(lambda: [e for e in d.find_elements(By.ID, NETWORK) if e.is_displayed()], 10, "the LoRA's network section")
    assert _value(d, "train-preset") == "tiny" and _value(d, "train-te_lr") == ""  # unset, not 0
    _pick(d, "train-preset", "tiny-quick")
    _wait(lambda: _value(d, "train-steps") == "30", 10, "the tiny-quick preset's 30 steps")
    kohya = tmp_path / "config_lora.toml"
    kohya.write_text('pretrained_model_name_or_path = "x"\nnetwork_dim = 12\nmax_train_steps = 7\nxformers = true\n')
    _open(d, "train-settings")
    d.find_element(By.CSS_SELECTOR, "#train-settings-file input[type=file]").send_keys(str(kohya))
    _wait(lambda: _value(d, "train-rank") == "12" and _value(d, "train-steps") == "7", 30, "the kohya config's values")
    _wait_text(d, "train-status", r"(?s)config_lora.toml's settings .*\n\n⚠️ config_lora.toml: read as a kohya "
                                  r"sd-scripts config; xformers changes nothing sdtune trains")
    other = "tiny-xl" if MODEL != "tiny-xl" else "tiny"
    _pick(d, "model", other)
    _wait_text(d, "model-status", f"base model: {other} ", 30)
    d.refresh()
    _wait(lambda: _value(d, "model") == other, 30, "the model in use in the reloaded page's menu")
    _wait_text(d, "model-status", f"^base model: {other}( |$)", 30)  # and its status line (it said the first one)
    _pick(d, "model", MODEL)
    _wait_text(d, "model-status", f"base model: {MODEL} ", 30)
