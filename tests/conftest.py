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
