"""The hierarchical GAN terms of the DMD stage (official `stage_3_post_gan_version.yaml`, `_generator_loss` /
`_critic_loss` in helios/utils/utils_helios_post.py; `stage.gan`, from its start step).

Discriminator heads (helios_train/algorithms/gan.py) read the critic's noisy-token hidden states after a few
blocks plus its output (helios_train/model/gan_taps.py). The generator adds L_G — its sample re-noised,
cropped and scored by the critic, only ∂L_G/∂x flowing back — and the critic adds L_D + approximate R1 on one
batched forward of [fake, real, real + σ·N].
"""
from __future__ import annotations

import torch

from helios_train.algorithms.gan import (approximate_r1, discriminator_gan_loss, generator_gan_loss,
                                         input_gradient_loss, perturb, random_spatial_crop)
from helios_train.model.gan_taps import critic_gan_logits, unwrap


class HierarchicalGan:
    """Mixed into the DMD stage (which provides `critic`, `roles`, `predict`, `adapter`, `cfg`, `device`)."""

    def gan_heads(self) -> torch.nn.Module:
        return unwrap(self.critic).gan_heads

    def _gan_call(self, model, x0, history, embeds, t, copies: int):
        """call(x) → one critic forward on x with the history/prompt/t repeated for `copies` stacked inputs."""
        rep = lambda z: None if z is None else z.repeat(copies, *([1] * (z.dim() - 1)))  # noqa: E731
        return lambda x: self.predict(model, x, rep(x0), rep(history), rep(t), rep(embeds), full_output=True)

    def _gan_crop(self, tensors, generator):
        """One random spatial box (a multiple of the patch) for every tensor; None (no x0 anchor) passes through."""
        patch = self.adapter.patch_size(self.critic)[1]
        present = [x for x in tensors if x is not None]
        cropped = iter(random_spatial_crop(present, self.cfg.stage.gan.crop_fraction, generator, multiple=patch))
        return [None if x is None else next(cropped) for x in tensors]

    def _gan_generator_loss(self, batch, x0_gen, x0, history, t, s, generator, logs):
        """L_G: the generator's sample re-noised at the same t with fresh noise, cropped, scored by the critic
        (adapters on). Only ∂L_G/∂x reaches the generator; the critic's parameters get no gradient."""
        g = self.cfg.stage.gan
        eps = torch.randn(x0_gen.shape, generator=generator).to(self.device)
        x_gan = (1 - s) * x0_gen + s * eps
        x_gan, hist_c, x0_c = self._gan_crop([x_gan, history, x0], generator)
        call = self._gan_call(self.critic, x0_c, hist_c, batch["prompt_embeds"], t, 1)
        loss = input_gradient_loss(lambda z: generator_gan_loss(critic_gan_logits(self.critic, None, call, z), g), x_gan)
        logs["gan/g_loss"] = float(loss.detach())
        return loss

    def _gan_discriminator_loss(self, batch, x_t, x0, history, t, s, eps, generator, logs):
        """L_D + approximate R1 on one batched critic forward of [fake, real, real + σ_R1·N] (same t, noise, crop).
        Real = the critic section's ground-truth chunk noised like the fake (stage.gan.real_from_primary: the
        generator section's chunk, official)."""
        g = self.cfg.stage.gan
        real = batch["primary_target"] if g.real_from_primary else batch["target"]
        real_t = (1 - s) * real.to(self.device) + s * eps
        fake_c, real_c, hist_c, x0_c = self._gan_crop([x_t, real_t, history, x0], generator)
        perturbed = perturb(real_c, g.r1_sigma, generator)
        call = self._gan_call(self.roles["critic"].model, x0_c, hist_c, batch["prompt_embeds"], t, 3)
        logits = critic_gan_logits(self.critic, None, call, torch.cat([fake_c, real_c, perturbed]))
        lf, lr, lp = logits.chunk(3)
        d_loss, r1 = discriminator_gan_loss(lf, lr, g), approximate_r1(lr, lp, g)
        logs.update({"gan/d_loss": float(d_loss.detach()), "gan/r1": float(r1.detach()),
                     "gan/logit_fake": float(lf.detach().mean()), "gan/logit_real": float(lr.detach().mean())})
        return d_loss + r1
