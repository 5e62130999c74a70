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
