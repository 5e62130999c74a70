"""The runs behind `difflab serve`, without a browser: previews, cancel, PNG settings, compare, bad input."""

import threading

import pytest
import torch

from difflab.files import read_settings
from difflab.serve import (
    RequestError,
    RunControl,
    ServeError,
    compare,
    generate,
    load_served,
    parse_request,
    request_from_settings,
    start,
)


@pytest.fixture
def served(tmp_path, digits_pipe):
    digits_pipe.save_pretrained(tmp_path / "digits")
    return load_served([tmp_path / "digits"])


def test_previews_every_step_and_the_png_restores_a_byte_identical_image(tmp_path, served):
    previews = []
    req = parse_request({"class_label": 3, "n": 2, "seed": 7, "steps": 5}, served)
    run = generate(served["digits"], req, tmp_path / "out", on_preview=lambda i, total, x: previews.append((i, total)))
    assert previews == [(i, 5) for i in range(1, 6)] and run.status == "finished" and run.nfe == 5
    again = request_from_settings(read_settings(run.files[1]), served)
    assert (again.seed, again.n, again.class_label, again.steps) == (7, 2, 3, 5)
    remade = generate(served["digits"], again, tmp_path / "again")
    assert remade.files[1].read_bytes() == run.files[1].read_bytes()
    assert torch.equal(served["digits"].pipeline.reproduce(read_settings(run.files[1])), run.images[1])


def test_cancel_stops_within_one_step_and_keeps_the_last_preview(tmp_path, served):
    control = RunControl()

    def cancel_at_step_three():
        while control.step < 3:
            pass
        control.cancel()

    canceller = threading.Thread(target=cancel_at_step_three)
    canceller.start()
    run = generate(served["digits"], parse_request({"steps": 400}, served), tmp_path, control=control)
    canceller.join()
    assert run.status == "cancelled" and run.steps_done - run.step_at_cancel <= 1 and run.steps_done < 400
    assert len(run.files) == 1 and read_settings(run.files[0])["cancelled_after_step"] == run.steps_done
    with pytest.raises(ValueError, match="cancelled"):
        served["digits"].pipeline.reproduce(read_settings(run.files[0]))
    assert request_from_settings(read_settings(run.files[0]), served).steps == 400  # dropping it back: the full run


def test_compare_runs_each_configuration_on_identical_noise(tmp_path, served):
    base = parse_request({"class_label": 1, "n": 2, "steps": 4}, served)
    configurations = [{"sampler": "euler"}, {"sampler": "euler", "steps": 4}, {"sampler": "heun"}]
    runs = compare(served, base, configurations, tmp_path)
    assert [r.nfe for r in runs] == [4, 4, 7]
    assert torch.equal(runs[0].images, runs[1].images)  # same noise, same configuration: same images
    assert not torch.equal(runs[0].images, runs[2].images)
    with pytest.raises(RequestError, match="2 to 4"):
        compare(served, base, [{"sampler": "euler"}], tmp_path)


@pytest.mark.parametrize("raw, message", [
    ({"steps": 0}, "steps must be a whole number from 1"),
    ({"n": 10_000}, "at most 16"),
    ({"sampler": "no_such"}, "unknown sampler 'no_such'; choose one of"),
    ({"pipeline": "other"}, "unknown pipeline 'other'"),
    ({"prompt": "a cat"}, "not a text-to-image pipeline"),
    ({"class_label": 12}, "class_label must be a whole number from -1 to 9"),
    ({"colour": "red"}, "unknown request field"),
    ({"sampler_options": "{oops"}, "not valid JSON"),
])
def test_bad_requests_are_refused_with_what_to_do(served, raw, message):
    with pytest.raises(RequestError, match=message):
        parse_request(raw, served)


def test_serve_refuses_to_start_on_a_folder_that_is_not_a_pipeline_or_a_port_in_use(tmp_path, served):
    import socket

    (tmp_path / "empty").mkdir()
    with pytest.raises(ServeError, match=r"failed to load as a pipeline: .* has no pipeline\.json"):
        start([tmp_path / "empty"], block=False)
    (tmp_path / "broken" / "network").mkdir(parents=True)
    (tmp_path / "broken" / "pipeline.json").write_text("{not json")
    with pytest.raises(ServeError, match="broken failed to load"):
        start([tmp_path / "broken"], block=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServeError, match=f"127.0.0.1:{port} .*choose another with --port"):
            start([tmp_path / "digits"], port=port, block=False)


def test_difflab_serve_on_a_folder_that_is_not_a_pipeline_exits_1_with_one_line(tmp_path, capsys):
    from difflab.cli import main

    (tmp_path / "photos").mkdir()
    assert main(["serve", str(tmp_path / "photos")]) == 1
    err = capsys.readouterr().err
    assert "difflab serve: error:" in err and "is not a difflab pipeline" in err and "Traceback" not in err


def _png64(array) -> str:
    """An image as the API sends it: a PNG in base64."""
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def adapted(tmp_path, digits_pipe):
    """The digits pipeline served with a LoRA and a ControlNet trained (here: randomised) on it."""
    from tests.conftest import randomise

    from difflab.adapters import ControlNet, LoRA

    digits_pipe.save_pretrained(tmp_path / "digits")
    lora = randomise(LoRA(digits_pipe.network, rank=2), 4)
    for p in lora.parameters():  # an update visible at these tiny weights
        p.data.mul_(20)
    lora.save_pretrained(tmp_path / "thick", base_identity=digits_pipe.identity())
    controlnet = randomise(ControlNet(digits_pipe.network, 1, downscale=1), 5)
    controlnet.save_pretrained(tmp_path / "edges", base_identity=digits_pipe.identity())
    return load_served([tmp_path / "digits"], loras=[tmp_path / "thick"], controlnets=[tmp_path / "edges"])


def test_img2img_and_inpainting_from_base64_images_keep_the_unmasked_pixels_and_restore(tmp_path, served):
    import numpy as np

    source = np.tile(np.linspace(0, 255, 8, dtype=np.uint8), (8, 1))
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 255
    out = tmp_path / "out"
    req = parse_request({"class_label": 4, "n": 2, "seed": 3, "steps": 6, "image": _png64(source),
                         "mask": _png64(mask)}, served, out)
    previews = []
    run = generate(served["digits"], req, out, on_preview=lambda i, total, x: previews.append(i))
    assert run.status == "finished" and previews and run.nfe == 6
    kept = torch.from_numpy(mask == 0).expand(2, 1, 8, 8)
    pixels = (torch.from_numpy(source).float() / 127.5 - 1).expand(2, 1, 8, 8)
    assert torch.allclose(run.images[kept], pixels[kept], atol=1e-6)  # inpainting keeps the black-mask pixels
    assert (run.images - pixels).abs()[~kept].max() > 0.05
    record = read_settings(run.files[1])
    assert record["edit"]["mode"] == "inpaint" and record["serve_request"]["mask"] == req.mask
    again = request_from_settings(record, served, out)  # the PNG restores the request, images included
    assert (again.image, again.mask, again.seed, again.n) == (req.image, req.mask, 3, 2)
    assert generate(served["digits"], again, out).files[1].read_bytes() == run.files[1].read_bytes()
    assert torch.equal(served["digits"].pipeline.reproduce(record), run.images[1])  # `difflab sample --settings`
    half = generate(served["digits"], parse_request({"class_label": 4, "image": req.image, "strength": 0.5,
                                                     "schedule": "uniform", "steps": 6}, served, out), out)
    assert half.nfe < run.nfe and read_settings(half.files[0])["edit"]["mode"] == "img2img"


def test_loras_and_controlnets_load_on_their_pipeline_and_change_the_images(tmp_path, adapted):
    import numpy as np

    digits = adapted["digits"]
    assert list(digits.loras) == ["thick"] and list(digits.controlnets) == ["edges"]
    out = tmp_path / "out"
    edge = np.zeros((8, 8), np.uint8)
    edge[:, 3] = 255
    base = {"class_label": 2, "n": 2, "steps": 4}
    plain = generate(digits, parse_request(base, adapted, out), out)
    zero = generate(digits, parse_request({**base, "loras": {"thick": 0}}, adapted, out), out)
    assert zero.files[0].read_bytes() == plain.files[0].read_bytes()  # scale 0 is no LoRA
    with_lora = generate(digits, parse_request({**base, "loras": {"thick": 1.5}}, adapted, out), out)
    controlled = generate(digits, parse_request({**base, "controls": [{"controlnet": "edges", "image": _png64(edge),
                                                                       "scale": 1.0}]}, adapted, out), out)
    for run in (with_lora, controlled):
        assert (run.images - plain.images).abs().max() > 1e-3
    record = read_settings(controlled.files[0])
    assert record["adapters"]["controls"][0]["scale"] == 1.0
    again = request_from_settings(record, adapted, out)
    assert generate(digits, again, out).files[0].read_bytes() == controlled.files[0].read_bytes()
    assert read_settings(with_lora.files[1])["adapters"]["loras"][0]["scale"] == 1.5


@pytest.mark.parametrize("raw, message", [
    ({"mask": "0123456789abcdef.png"}, "a mask needs the image"),
    ({"strength": 0.5}, "strength applies to a source image"),
    ({"image": "not base64 !"}, "neither base64 image data nor the name"),
    ({"image": "aGVsbG8="}, "not a readable PNG or JPEG"),
    ({"image": "0123456789abcdef.png"}, "not an image this server keeps"),
    ({"loras": {"fat": 1.0}}, "unknown LoRA 'fat' for digits; it has thick"),
    ({"loras": {"thick": 99}}, "scale must be from -10 to 10"),
    ({"controls": [{"controlnet": "edges"}]}, "needs a control image"),
    ({"controls": [{"controlnet": "depth", "image": "x"}]}, "unknown ControlNet 'depth'"),
])
def test_bad_image_and_adapter_requests_say_what_to_send(tmp_path, adapted, raw, message):
    with pytest.raises(RequestError, match=message):
        parse_request(raw, adapted, tmp_path)


def test_a_source_image_of_another_size_or_with_an_accelerator_is_refused(tmp_path, served):
    import numpy as np

    big = _png64(np.zeros((16, 16), np.uint8))
    req = parse_request({"image": big}, served, tmp_path)
    with pytest.raises(RequestError, match="16x16 pixels; digits makes 8x8 images"):
        generate(served["digits"], req, tmp_path)
    with pytest.raises(RequestError, match="accelerators apply to generation from noise"):
        parse_request({"image": big, "accelerator": "deep_cache"}, served, tmp_path)


def test_an_adapter_for_weights_no_served_pipeline_has_is_refused_before_serving(tmp_path, digits_pipe):
    from difflab.adapters import LoRA

    digits_pipe.save_pretrained(tmp_path / "digits")
    LoRA(digits_pipe.network, rank=2).save_pretrained(tmp_path / "stray", base_identity="0123456789abcdef")
    with pytest.raises(ServeError, match=r"--lora .*stray was trained on weights 0123456789abcdef; no served pipeline"):
        load_served([tmp_path / "digits"], loras=[tmp_path / "stray"])
    with pytest.raises(ServeError, match=r"--controlnet .*digits: no controlnet\.json there"):
        load_served([tmp_path / "digits"], controlnets=[tmp_path / "digits"])


def test_difflab_serve_with_a_lora_for_other_weights_exits_1_naming_it(tmp_path, digits_pipe, capsys):
    from difflab.adapters import LoRA
    from difflab.cli import main

    digits_pipe.save_pretrained(tmp_path / "digits")
    LoRA(digits_pipe.network, rank=2).save_pretrained(tmp_path / "stray", base_identity="0123456789abcdef")
    assert main(["serve", str(tmp_path / "digits"), "--lora", str(tmp_path / "stray")]) == 1
    err = capsys.readouterr().err
    assert "stray was trained on weights 0123456789abcdef" in err and "Traceback" not in err
