"""Prompt-to-prompt's attention control through the hook interface, on a tiny text U-Net."""

import pytest
import torch

import difflab
from difflab import analytic, editing, guidance, processes
from difflab.models import UNet, UNetConfig


@pytest.fixture
def text_den():
    torch.manual_seed(0)
    net = UNet(UNetConfig(in_channels=2, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                          attention_levels=(0, 1), head_dim=8, norm_groups=8, context_dim=12)).eval()
    for p in net.parameters():
        p.data.normal_(0, 0.15)
    return difflab.Denoiser(net, processes.Flow(), "flow")


def _prompts(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(n, 5, 12, generator=g)
    target = source.clone()
    target[:, 2] = torch.randn(n, 12, generator=g)  # one word swapped
    return {"context": torch.cat([source, target]), "context_mask": torch.ones(2 * n, 5, dtype=torch.bool)}


def test_an_empty_window_is_the_plain_model_and_the_sources_are_never_changed(text_den):
    cond = _prompts()
    noise = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(2)).repeat(2, 1, 1, 1)
    plain = difflab.sample(text_den, noise, "ddim", 8, cond=cond)
    off = editing.PromptToPrompt(text_den, 2, cross_until=1.0, self_until=1.0)
    assert torch.equal(difflab.sample(off, noise, "ddim", 8, cond=cond), plain)
    on = difflab.sample(editing.PromptToPrompt(text_den, 2, cross_until=0.0, self_until=0.5), noise, "ddim", 8,
                        cond=cond)
    torch.testing.assert_close(on[:2], plain[:2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(on[2:], plain[2:], atol=1e-4)
    same = {"context": cond["context"][:2].repeat(2, 1, 1), "context_mask": cond["context_mask"]}
    twins = difflab.sample(editing.PromptToPrompt(text_den, 2, cross_until=0.0, self_until=0.0), noise, "ddim", 8,
                           cond=same)
    torch.testing.assert_close(twins[2:], twins[:2], atol=1e-5, rtol=1e-5)  # one prompt twice: nothing to edit


def test_the_target_attends_with_the_sources_maps_and_reweighted_tokens(text_den):
    from difflab.editing.attention import attention_probs
    from difflab.models.layers import Attention

    torch.manual_seed(4)
    attn = Attention(8, 2, context_dim=6)
    x, context = torch.randn(4, 9, 8), torch.randn(4, 5, 6)
    maps: list = []
    p2p = editing.PromptToPrompt(text_den, 2, reweight={1: 2.0})
    out = p2p._processor(True, True, maps)(attn, x, context, None, None)
    q, k, v = attn.qkv(x, context)
    probs = attention_probs(attn, q, k, None)
    target = probs[:2] * torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0])
    torch.testing.assert_close(out[2:], attn.out(target @ v[2:]))
    torch.testing.assert_close(out[:2], attn.out(probs[:2] @ v[:2]))


def test_local_blending_keeps_the_source_outside_the_edited_words_region(text_den):
    for name, p in text_den.net.named_parameters():
        if "attn2.to_q" in name:  # peaked cross-attention, as a trained model's: a localised region
            p.data *= 20
    cond = _prompts()
    noise = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(3)).repeat(2, 1, 1, 1)
    cfg = guidance.guide(text_den, "cfg", scale=3.0, uncond={"context": torch.zeros(1, 5, 12),
                                                             "context_mask": torch.ones(1, 5, dtype=torch.bool)})
    p2p = editing.PromptToPrompt(cfg, 2, cross_until=0.5, blend=[2], threshold=0.95)
    out = difflab.sample(p2p, noise, "ddim", 8, cond=cond)
    same = (out[2:] == out[:2]).flatten(1).float().mean(1)
    assert bool((same > 0.05).all()) and bool((same < 1).all())  # part kept exactly, part edited


def test_what_prompt_to_prompt_cannot_edit_is_refused(text_den):
    mix = analytic.GaussianMixture.low_rank(dim=4, num_components=2, rank=1)
    with pytest.raises(editing.EditError, match="no difflab network"):
        editing.PromptToPrompt(mix.denoiser(processes.Flow(), "flow"), 1)
    p2p = editing.PromptToPrompt(text_den, 2)
    cond = _prompts()
    with pytest.raises(editing.EditError, match="batch of 4"):
        p2p(torch.zeros(2, 2, 8, 8), 0.5, **{k: v[:2] for k, v in cond.items()})
    cond["context_mask"][3, 4] = False
    with pytest.raises(editing.EditError, match="same number of tokens"):
        p2p(torch.zeros(4, 2, 8, 8), 0.5, **cond)
    with pytest.raises(editing.EditError, match="in \\[0, 1\\]"):
        editing.PromptToPrompt(text_den, 2, cross_until=2.0)


def test_consistent_self_attention_shares_tokens_within_a_story_only(text_den):
    cond = _prompts()
    noise = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(5))
    plain = difflab.sample(text_den, noise, "ddim", 6, cond=cond)
    assert torch.equal(difflab.sample(editing.ConsistentSelfAttention(text_den, 2, rate=0.0), noise, "ddim", 6,
                                      cond=cond), plain)
    story = editing.ConsistentSelfAttention(text_den, 2, rate=0.5, seed=1)
    a = difflab.sample(story, noise, "ddim", 6, cond=cond)
    assert torch.equal(difflab.sample(story, noise, "ddim", 6, cond=cond), a)  # same seed, same run
    assert not torch.allclose(a, plain, atol=1e-4)
    changed = noise.clone()
    changed[1] = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(9))
    b = difflab.sample(story, changed, "ddim", 6, cond=cond)
    assert not torch.allclose(b[0], a[0], atol=1e-5)  # image 0 sees its story's other image
    torch.testing.assert_close(b[2:], a[2:])  # the other story does not
    with pytest.raises(editing.EditError, match="stories of 3"):
        difflab.sample(editing.ConsistentSelfAttention(text_den, 3), noise, "ddim", 2, cond=cond)


def test_refinement_copies_the_maps_of_matching_words_and_keeps_new_words_own():
    from difflab.editing.attention import attention_probs
    from difflab.models.layers import Attention

    source = ["[CLS]", "a", "red", "circle", "[SEP]"]
    target = ["[CLS]", "a", "small", "red", "circle", "[SEP]"]
    index = editing.align_tokens(source, target, 7)
    assert index.tolist() == [0, 1, -1, 2, 3, 4, -1]
    torch.manual_seed(4)
    attn = Attention(8, 2, context_dim=6)
    x, context = torch.randn(2, 9, 8), torch.randn(2, 7, 6)
    net_den = difflab.Denoiser(UNet(UNetConfig(in_channels=1, model_channels=8, channel_mult=(1,), num_res_blocks=1,
                                               attention_levels=(0,), head_dim=8, norm_groups=4, context_dim=6)),
                               processes.Flow(), "flow")
    p2p = editing.PromptToPrompt(net_den, 1, alignment=index[None])
    out = p2p._processor(True, False, [])(attn, x, context, None, None)
    q, k, v = attn.qkv(x, context)
    probs = attention_probs(attn, q, k, None)
    expected = torch.where(index >= 0, probs[0][..., index.clamp_min(0)], probs[1])
    torch.testing.assert_close(out[1:], attn.out((expected @ v[1])[None]))
    with pytest.raises(editing.EditError, match="alignment"):
        editing.PromptToPrompt(net_den, 2, alignment=index[None])
