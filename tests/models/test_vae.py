import math

import pytest
import torch

from difflab.models import VAE, VAEConfig
from difflab.models.vae import DiagonalGaussian, PatchDiscriminator, discriminator_loss, vae_loss


def tiny_vae(**kw):
    cfg = dict(in_channels=3, latent_channels=4, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
               norm_groups=8)
    cfg.update(kw)
    return VAE(VAEConfig(**cfg))


def test_encode_decode_shapes_and_factor():
    vae = tiny_vae(channel_mult=(1, 2, 2))
    x = torch.randn(2, 3, 16, 24)
    post = vae.encode(x)
    assert post.mean.shape == (2, 4, 4, 6)
    assert vae.decode(post.sample()).shape == x.shape
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 4"):
        vae.encode(torch.randn(1, 3, 10, 16))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.randn(1, 3, 4, 4))


def test_kl_sign_and_scale():
    zero = DiagonalGaussian(torch.zeros(3, 8, 2, 2))  # mean 0, logvar 0: the prior itself
    torch.testing.assert_close(zero.kl(), torch.zeros(3))
    mean = torch.full((1, 4, 2, 2), 0.5)
    logvar = torch.full((1, 4, 2, 2), math.log(0.25))
    post = DiagonalGaussian(torch.cat([mean, logvar], 1))
    per_element = 0.5 * (0.25 + 0.25 - 1 - math.log(0.25))
    torch.testing.assert_close(post.kl(), torch.tensor([16 * per_element]))
    assert float(post.kl()) > 0


def test_scaling_factor_gives_unit_variance_latents():
    vae = tiny_vae()
    images = torch.randn(16, 3, 8, 8) * 3
    factor = vae.fit_scaling(images)
    assert factor > 0
    lat = vae.to_latent(images)
    assert abs(float(lat.std()) - 1.0) < 1e-4
    torch.testing.assert_close(vae.decode(lat / factor), vae.from_latent(lat))


def test_vae_overfits_a_handful_of_images_with_discriminator_loss_finite():
    torch.manual_seed(0)
    vae = tiny_vae()
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        recon, post = vae(x, generator=torch.Generator().manual_seed(0))
        loss = vae_loss(recon, x, post, kl_weight=1e-6)
        opt.zero_grad()
        loss["total"].backward()
        opt.step()
        first = first or float(loss["reconstruction"])
    assert float(loss["reconstruction"]) < first / 10
    disc = PatchDiscriminator(3, channels=8, layers=2)
    parts = vae_loss(recon, x, post, discriminator=disc)
    assert torch.isfinite(parts["adversarial"]) and torch.isfinite(discriminator_loss(disc, x, recon))
