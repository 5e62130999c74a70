import pytest
import torch
from torch import nn

from difflab.training.ema import ema_decay, ema_model


def test_warmup_follows_the_tensorflow_rule_and_reaches_the_decay():
    assert ema_decay(0.999, 0) == pytest.approx(0.1)
    assert ema_decay(0.999, 90) == pytest.approx(91 / 100)
    assert ema_decay(0.999, 10_000) == 0.999
    assert ema_decay(0.999, 0, warmup=False) == 0.999
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ema_model(nn.Linear(2, 2), 1.0)


@pytest.mark.parametrize("warmup", [True, False])
def test_average_equals_the_closed_form_recursion(warmup):
    net = nn.Linear(3, 1)
    ema = ema_model(net, 0.99, warmup)
    expected = None
    for step in range(30):
        with torch.no_grad():
            net.weight.fill_(float(step))
        ema.update_parameters(net)
        w = net.weight.detach().clone()
        expected = w if expected is None else torch.lerp(expected, w, 1 - ema_decay(0.99, step - 1, warmup))
    torch.testing.assert_close(ema.module.weight, expected)


def test_warmup_keeps_early_averages_off_the_initial_weights():
    """After 300 updates toward a new value, a plain 0.999 average still holds 74 % of the start;
    the warmed-up one has moved almost all the way."""
    results = {}
    for warmup in (True, False):
        net = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            net.weight.fill_(0.0)
        ema = ema_model(net, 0.999, warmup)
        ema.update_parameters(net)  # the copy of the initial weights
        with torch.no_grad():
            net.weight.fill_(1.0)
        for _ in range(300):
            ema.update_parameters(net)
        results[warmup] = float(ema.module.weight)
    assert results[False] == pytest.approx(1 - 0.999 ** 300, rel=1e-4)
    assert results[True] > 0.95
