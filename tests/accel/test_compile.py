"""torch.compile on a pipeline: once per shape, then no recompilation inside or across sampling
calls — with the block caches, token merging, the guidance cache, T-GATE and attention reuse too —
and the same images (the eager backend here: it traces and guards like inductor without compiling
C++). int8 is not among them: its quantized layers are new objects in each call, so a compiled
network recompiles once per call with it."""

import pytest
import torch
import torch._dynamo
from tests.conftest import perturb

from difflab import processes
from difflab.models import UNet, UNetConfig
from difflab.pipeline import Pipeline

ACCELERATORS = [None, {"name": "deep_cache", "interval": 3}, {"name": "token_merging", "ratio": 0.5},
                {"name": "guidance_cache", "refresh": 2}, {"name": "t_gate", "gate": 2},
                {"name": "attention_reuse", "refresh": 2, "share_branches": True}]


def _pipe():
    torch.manual_seed(0)
    net = perturb(UNet(UNetConfig(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                  attention_levels=(1,), head_dim=8, norm_groups=8, context_dim=8)), 0.05)
    return Pipeline(net, processes.Flow(), "flow", sample_shape=(1, 8, 8), steps=4, cond_dropout=0.1)


@pytest.mark.parametrize("accelerator", ACCELERATORS, ids=lambda a: a["name"] if a else "plain")
def test_a_compiled_pipeline_does_not_recompile_across_steps_and_runs(accelerator):
    context = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1))
    pipe = _pipe()
    from difflab.models import conditioning

    class Fixed(conditioning.TextEncoder):  # a tiny text encoder: fixed tokens per prompt
        name, dim = "fixed", 8

        def encode_one(self, prompt):
            return context[len(prompt) % 2], context[len(prompt) % 2].mean(0)

    pipe.text_encoder_config, pipe._encoder = {"name": "fixed"}, Fixed(max_tokens=3)
    kw = {"prompts": ["a", "bb"], "guidance": "cfg", "guidance_options": {"scale": 2.0}, "accelerator": accelerator}
    eager = pipe(2, steps=6, **kw).images
    torch._dynamo.reset()
    pipe.compile(backend="eager")
    pipe(2, steps=4, **kw)  # compiles each shape and variant once (a cache's refresh with and without saved outputs)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = pipe(2, steps=6, **kw).images  # more steps, a new run: no recompilation
    assert torch.equal(compiled, eager)
    torch._dynamo.reset()
