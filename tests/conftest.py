import pytest
import torch

torch.set_num_threads(1)

ALL_PROCESSES = {
    "linear": lambda: __import__("difflab").processes.DiscreteVP.linear(),
    "scaled_linear": lambda: __import__("difflab").processes.DiscreteVP.scaled_linear(),
    "scaled_linear_zsnr": lambda: __import__("difflab").processes.DiscreteVP.scaled_linear(zero_terminal_snr=True),
    "cosine_discrete": lambda: __import__("difflab").processes.DiscreteVP.cosine(),
    "vp_linear": lambda: __import__("difflab").processes.ContinuousVP.linear(),
    "vp_cosine": lambda: __import__("difflab").processes.ContinuousVP.cosine(),
    "ve": lambda: __import__("difflab").processes.VE(),
    "edm": lambda: __import__("difflab").processes.EDM(),
    "flow": lambda: __import__("difflab").processes.Flow(),
    "flow_shift3": lambda: __import__("difflab").processes.Flow(shift=3.0),
}


@pytest.fixture(params=sorted(ALL_PROCESSES))
def process(request):
    return ALL_PROCESSES[request.param]()


def randomise(net, seed=0):
    """A network with small random weights (a zero-initialised output layer would make it constant)."""
    torch.manual_seed(seed)
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    return net


def perturb(model, scale: float = 0.02):
    """Another library's freshly made model moved off its initialisation (zero-initialised outputs
    would hide every path but the skip), in place, under the current torch seed."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


@pytest.fixture
def digits_pipe():
    """A tiny class-conditional pixel pipeline of the digits shape (untrained)."""
    from difflab import processes
    from difflab.models import UNet, UNetConfig
    from difflab.pipeline import Pipeline

    net = randomise(UNet(UNetConfig(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                    attention_levels=(1,), head_dim=16, norm_groups=8, num_classes=10)))
    return Pipeline(net, processes.Flow(), "flow", sample_shape=(1, 8, 8), steps=6, num_classes=10, cond_dropout=0.1)
