"""`difflab serve` in a real browser (Debian's Chromium driven by Playwright), against a server this
test starts on a free localhost port with two tiny pipelines (text and class-conditional)."""

import os
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch

playwright = pytest.importorskip("playwright.sync_api", reason="the browser tests need `pip install playwright`")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="the browser tests need Debian's chromium "
                                "(apt-get install chromium); .ci/run installs it")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]
SHOTS = Path(os.environ.get("DIFFLAB_SCREENSHOTS", "test-artifacts/serve"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def server(root):
    from tests.conftest import randomise

    from difflab import processes
    from difflab.adapters import ControlNet, LoRA
    from difflab.models import UNet, UNetConfig
    from difflab.pipeline import Pipeline
    from difflab.serve import start

    small = {"model_channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1, "attention_levels": (1,),
             "head_dim": 16, "norm_groups": 8}
    text = randomise(UNet(UNetConfig(in_channels=3, context_dim=384, **small)), 1)
    Pipeline(text, processes.Flow(), "flow", sample_shape=(3, 8, 8), steps=8, cond_dropout=0.1,
             text_encoder={"name": "minilm", "max_tokens": 8}).save_pretrained(root / "shapes")
    digits = randomise(UNet(UNetConfig(in_channels=1, num_classes=10, **small)), 2)
    pipe = Pipeline(digits, processes.Flow(), "flow", sample_shape=(1, 8, 8), steps=8, num_classes=10,
                    cond_dropout=0.1, guidance={"method": "cfg", "options": {"scale": 2.0}})
    pipe.save_pretrained(root / "digits")
    lora = randomise(LoRA(digits, rank=2), 3)
    for p in lora.parameters():  # an update visible at these tiny weights
        p.data.mul_(20)
    lora.save_pretrained(root / "thick", base_identity=pipe.identity())
    randomise(ControlNet(digits, 1, downscale=1), 4).save_pretrained(root / "edges", base_identity=pipe.identity())
    torch.set_num_threads(1)
    app, url = start([root / "shapes", root / "digits"], port=_free_port(), out_dir=root / "out", block=False,
                     quiet=True, loras=[root / "thick"], controlnets=[root / "edges"])
    yield url
    app.close()


@pytest.fixture(scope="module")
def browser(server):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


def _page(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1100}, accept_downloads=True)
    page.goto(url)
    page.wait_for_selector("#generate")
    return page


def _set(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(str(value))
    box.press("Tab")


def _choose(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input").first
    box.fill(value)
    page.get_by_role("option", name=value, exact=True).click()


def _status(page) -> str:
    return page.locator("#status").inner_text()


def _wait_status(page, pattern: str, timeout: float = 60_000, errors_fail: bool = True) -> str:
    """The status once it matches ``pattern``; an error message the page shows instead fails at once, with it."""
    error = "document.querySelector('.toast-body.error') !== null" if errors_fail else "false"
    page.wait_for_function(f"() => /{pattern}/.test(document.querySelector('#status').innerText) || {error}",
                           timeout=timeout)
    errors = page.locator(".toast-body.error")
    assert not errors_fail or errors.count() == 0, f"the page shows an error: {errors.first.inner_text()}"
    return _status(page)


def _download(page, index: int = 0) -> bytes:
    link = page.locator("#downloads a").nth(index)
    return page.request.get(link.get_attribute("href")).body()


def test_generate_shows_previews_then_images_and_history(browser, server):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = _page(browser, server)
    _set(page, "prompt", "a red circle")
    _set(page, "steps", 60)
    # record every status the page shows, so "a preview came before the final image" is observed, not assumed
    page.evaluate("""() => { window.seen = [];
        new MutationObserver(() => window.seen.push([document.querySelector('#status').innerText,
                                                     document.querySelectorAll('#gallery img').length]))
            .observe(document.querySelector('#status'), {subtree: true, childList: true, characterData: true}); }""")
    page.locator("#generate").click()
    final = _wait_status(page, "finished")
    seen = page.evaluate("window.seen")
    previews = [s for s, imgs in seen if re.search(r"step \d+/60", s)]
    assert previews, f"no preview before the final image: {seen}"
    assert "4 image(s), 60 steps, 60 NFE" in final and page.locator("#gallery img").count() == 4
    page.screenshot(path=SHOTS / "generate.png", full_page=True)
    page.get_by_role("tab", name="History").click()
    assert page.locator("#history_table").inner_text().count("finished") == 1
    page.close()


def test_cancel_stops_within_one_step_and_the_run_stays_in_the_history(browser, server):
    page = _page(browser, server)
    _set(page, "prompt", "a blue square")
    _set(page, "steps", 500)
    page.locator("#generate").click()
    _wait_status(page, r"step \d+\/500")
    page.locator("#cancel").click()
    text = _wait_status(page, "cancelled")
    done, arrived = map(int, re.search(r"after step (\d+) of 500 \(cancel arrived at step (\d+)\)", text).groups())
    assert done - arrived <= 1 and done < 500
    page.get_by_role("tab", name="History").click()
    assert "cancelled" in page.locator("#history_table").inner_text()
    assert page.locator("#history img").count() == 1  # its last preview is kept
    page.screenshot(path=SHOTS / "history.png", full_page=True)
    page.close()


def test_a_dropped_png_restores_every_setting_and_regenerates_the_same_bytes(browser, server, tmp_path):
    page = _page(browser, server)
    _choose(page, "pipeline", "digits")
    _choose(page, "class_label", "7")
    _set(page, "seed", 41)
    _set(page, "n", 3)
    _choose(page, "sampler", "heun")
    _set(page, "steps", 5)
    _set(page, "scale", 3.5)
    page.locator("#generate").click()
    _wait_status(page, "finished")
    original = _download(page, 2)
    (tmp_path / "image.png").write_bytes(original)
    page.close()

    page = _page(browser, server)  # a fresh page: every control at its default
    page.locator("#restore input[type=file]").set_input_files(str(tmp_path / "image.png"))
    _wait_status(page, "restored the settings")
    values = {k: page.locator(f"#{k} input").first.input_value()
              for k in ("pipeline", "class_label", "seed", "n", "sampler", "steps", "scale")}
    assert values == {"pipeline": "digits", "class_label": "7", "seed": "41", "n": "3", "sampler": "heun",
                      "steps": "5", "scale": "3.5"}
    page.locator("#generate").click()
    _wait_status(page, "finished")
    assert _download(page, 2) == original
    page.close()


def test_compare_shows_one_column_per_configuration(browser, server):
    page = _page(browser, server)
    _set(page, "prompt", "a green triangle")
    _set(page, "n", 2)
    page.get_by_role("tab", name="Compare").click()
    page.locator("#use2 input").check()
    page.locator("#compare").click()
    page.wait_for_function("() => document.querySelectorAll('#compare_gallery img').length === 6", timeout=60_000)
    table = page.locator("#compare_table").inner_text()
    cells = table.split()
    rows = [cells[i: i + 10] for i in range(cells.index("image") + 1, len(cells), 10)]  # after the header
    assert [(r[0], r[1], r[7]) for r in rows] == [("1", "dpmpp_2m", "8"), ("2", "euler", "8"), ("3", "heun", "7")]
    captions = page.locator("#compare_gallery").inner_text()
    assert captions.index("1: dpmpp_2m") < captions.index("2: euler") < captions.index("3: heun")
    page.screenshot(path=SHOTS / "compare.png", full_page=True)
    page.close()


def test_two_sessions_generating_at_once_each_get_their_own_images(browser, server):
    pages = []
    for seed in (3, 9):
        context = browser.new_context(viewport={"width": 1400, "height": 1100})
        page = context.new_page()
        page.goto(server)
        page.wait_for_selector("#generate")
        _set(page, "prompt", "a red circle")
        _set(page, "seed", seed)
        _set(page, "n", 1)
        _set(page, "steps", 30)
        pages.append((seed, page))
    for _, page in pages:
        page.locator("#generate").click()
    made = []
    for seed, page in pages:
        _wait_status(page, "finished")
        record = page.locator("#record").inner_text().replace("\n", " ")
        assert re.search(rf'"seed"\s*:\s*{seed}\b', record), record
        made.append(_download(page))
        page.context.close()
    assert made[0] != made[1]  # each session got its own image, not the other's


def test_bad_input_gets_a_message_on_the_page_and_the_server_keeps_running(browser, server):
    page = _page(browser, server)
    _set(page, "prompt", "a red circle")
    _set(page, "steps", 0)
    page.locator("#generate").click()
    page.get_by_text("steps must be a whole number from 1 to 500").first.wait_for(timeout=20_000)
    _set(page, "steps", 4)
    _set(page, "n", 1000)
    page.locator("#generate").click()
    page.get_by_text("at most 16 per request").first.wait_for(timeout=20_000)
    _set(page, "n", 1)
    page.locator("#generate").click()
    assert "1 image(s), 4 steps" in _wait_status(page, "finished", errors_fail=False)  # the earlier ones still show
    page.close()


def _png(path: Path, array) -> Path:
    from PIL import Image

    Image.fromarray(array).save(path)
    return path


def _pixels(data: bytes):
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


def test_an_inpainting_mask_drawn_on_the_page_keeps_the_rest_and_the_png_restores_it(browser, server, root, tmp_path):
    import numpy as np

    from difflab.files import read_settings

    source = np.tile(np.linspace(0, 255, 8, dtype=np.uint8), (8, 1))
    page = _page(browser, server)
    _choose(page, "pipeline", "digits")
    _choose(page, "class_label", "7")
    _set(page, "n", 2)
    _set(page, "steps", 6)
    page.locator("#extras").get_by_text("image to image").click()
    page.locator("#source canvas").first.wait_for()
    zoom = "() => (document.querySelector('#source').innerText.match(/\\d+%/) || [''])[0]"
    empty = page.evaluate(zoom)
    page.locator("#source input[type=file]").first.set_input_files(str(_png(tmp_path / "source.png", source)))
    # the editor zooms to the uploaded background once it is drawn: paint only then
    page.wait_for_function(f"() => ({zoom})() !== {empty!r}", timeout=30_000)
    page.wait_for_timeout(500)
    page.locator("#source button[aria-label=Brush]").click()
    page.wait_for_timeout(300)
    box = page.locator("#source canvas").first.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2  # the image sits in the middle
    page.mouse.move(x - 20, y)
    page.mouse.down()
    page.mouse.move(x + 20, y, steps=12)  # a stroke across the middle rows
    page.mouse.up()
    page.screenshot(path=SHOTS / "inpaint.png", full_page=True)
    page.locator("#generate").click()
    assert "2 image(s), 6 steps, 6 NFE" in _wait_status(page, "finished")
    original = _download(page, 1)
    (tmp_path / "made.png").write_bytes(original)
    record = read_settings(tmp_path / "made.png")
    assert record["edit"]["mode"] == "inpaint"
    mask = _pixels((root / "out" / "inputs" / record["serve_request"]["mask"]).read_bytes()) > 0
    assert 0 < mask.sum() < 32  # the stroke, not the whole image
    made = _pixels(original)
    assert np.array_equal(made[~mask], source[~mask]) and not np.array_equal(made[mask], source[mask])
    page.close()

    page = _page(browser, server)  # a fresh page: the PNG brings back the image, the mask and the rest
    page.locator("#restore input[type=file]").set_input_files(str(tmp_path / "made.png"))
    _wait_status(page, "restored the settings")
    page.locator("#generate").click()
    _wait_status(page, "finished")
    assert _download(page, 1) == original
    page.close()


def test_a_lora_scale_and_a_control_image_set_on_the_page_reach_the_images(browser, server, tmp_path):
    import numpy as np

    from difflab.files import read_settings

    edge = np.zeros((8, 8), np.uint8)
    edge[:, 3] = 255
    page = _page(browser, server)
    assert not page.locator("#lora-digits-thick").is_visible()  # adapters show on their own pipeline only
    _choose(page, "pipeline", "digits")
    _choose(page, "class_label", "2")
    _set(page, "n", 1)
    _set(page, "steps", 4)
    page.locator("#generate").click()
    first = int(re.search(r"run #(\d+)", _wait_status(page, "finished")).group(1))
    plain = _download(page)
    page.locator("#extras").get_by_text("image to image").click()
    _set(page, "lora-digits-thick", 1.5)
    page.locator("#control-digits-edges input[type=file]").set_input_files(str(_png(tmp_path / "edge.png", edge)))
    page.locator("#control-digits-edges img").first.wait_for()
    page.locator("#generate").click()
    _wait_status(page, f"run #{first + 1}:")
    controlled = _download(page)
    assert controlled != plain
    (tmp_path / "controlled.png").write_bytes(controlled)
    adapters = read_settings(tmp_path / "controlled.png")["adapters"]
    assert adapters["loras"][0]["scale"] == 1.5 and adapters["controls"][0]["scale"] == 1.0
    page.screenshot(path=SHOTS / "adapters.png", full_page=True)
    page.close()

    page = _page(browser, server)
    page.locator("#restore input[type=file]").set_input_files(str(tmp_path / "controlled.png"))
    _wait_status(page, "restored the settings")
    assert page.locator("#lora-digits-thick input[type=number]").input_value() == "1.5"
    page.locator("#generate").click()
    _wait_status(page, "finished")
    again = _download(page)
    (tmp_path / "again.png").write_bytes(again)
    assert read_settings(tmp_path / "again.png") == read_settings(tmp_path / "controlled.png")
    assert again == controlled
    page.close()


def _api(url: str, name: str, payload: list) -> tuple[str, object]:
    """One call of the JSON API over plain HTTP, as the API tab documents: POST, then read the
    event stream; returns (event, data)."""
    import json
    import urllib.request

    post = urllib.request.Request(f"{url}gradio_api/call/{name}", data=json.dumps({"data": payload}).encode(),
                                  headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=60) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/{name}/{event_id}", timeout=120) as response:
        lines = response.read().decode().splitlines()
    events = [line.split(":", 1)[1].strip() for line in lines if line.startswith("event:")]
    data = [line.split(":", 1)[1].strip() for line in lines if line.startswith("data:")]
    final = events[-1]
    return final, json.loads(data[-1]) if data[-1] not in ("", "null") else None


def test_the_json_api_over_raw_http_generates_edits_and_answers_bad_requests(server, tmp_path):
    import base64
    import io

    import numpy as np
    from PIL import Image

    event, data = _api(server, "pipelines", [])
    listing = data[0]
    assert event == "complete" and listing["pipelines"]["digits"]["loras"] == ["thick"]
    assert "euler" in listing["samplers"] and listing["pipelines"]["digits"]["image_size"] == [8, 8]
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(buffer, format="PNG")
    request = {"pipeline": "digits", "class_label": 5, "seed": 2, "n": 2, "steps": 4, "strength": 0.6,
               "image": base64.b64encode(buffer.getvalue()).decode(), "loras": {"thick": 1.0}}
    event, data = _api(server, "generate", [request])
    result = data[0]
    assert event == "complete" and len(result["images"]) == 2 and result["nfe"] > 0
    (tmp_path / "one.png").write_bytes(base64.b64decode(result["images"][1]))
    from difflab.files import read_settings

    record = read_settings(tmp_path / "one.png")
    assert record["edit"]["mode"] == "img2img" and record["adapters"]["loras"][0]["scale"] == 1.0
    again = {**record["serve_request"]}  # the record's request, its image by the name the server keeps it under
    event, data = _api(server, "generate", [again])
    assert base64.b64decode(data[0]["images"][1]) == (tmp_path / "one.png").read_bytes()
    event, data = _api(server, "generate", [{"pipeline": "digits", "sampler": "no_such"}])
    assert event == "error" and "unknown sampler 'no_such'" in str(data)
    event, _ = _api(server, "pipelines", [])
    assert event == "complete"  # the server keeps running
