import torch
from torch import nn

from difflab.training.optim import adamw


def test_fused_adamw_on_the_cpu_matches_the_reference_update():
    torch.manual_seed(0)
    a, b = nn.Linear(8, 4), nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    start = a.weight.detach().clone()
    fused = adamw(a.parameters(), 1e-2, weight_decay=0.1)
    plain = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    assert fused.defaults["fused"] is True
    for _ in range(5):
        x = torch.randn(16, 8)
        for net, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)
    assert (a.weight - start).abs().max() > 1e-2  # the steps did move the weights

