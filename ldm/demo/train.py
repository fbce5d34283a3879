"""Training of the demo model: the KL autoencoder, then the text-conditioned latent diffusion.

Plain PyTorch loops over a fixed procedural dataset held in memory (see `shapes.py`), seeded
end to end: the same seed and thread count give the same weights on the same machine.

1. `train_autoencoder`: L1 reconstruction + a small KL term (as the original's
   LPIPSWithDiscriminator without the perceptual and adversarial parts).
2. `encode_dataset` + `latent_scale`: the posterior of every image, and
   scale_factor = 1 / std of the latents (the original's `scale_by_std`).
3. `train_diffusion`: the eps-prediction loss of DDPM, Ho et al. 2020, eq. (14), on
   z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps, with the UNet and the small CLIP text encoder
   trained together; the caption is replaced by "" with probability `p_uncond` so the same
   model also gives the unconditional prediction that classifier-free guidance needs.
"""

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .shapes import random_caption, to_tensor

log = logging.getLogger(__name__)


def lr_lambda(total, warmup):
    """Linear warm-up, then cosine decay to zero."""

    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    return f


def _optimizer(params, lr, steps, warmup, weight_decay=0.0):
    # fused: one kernel per step instead of a dozen per tensor (4x faster on CPU, same update)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay, fused=True)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, warmup))


class EMA:
    """Exponential moving average of parameters (the original's LitEma), with its warm-up:
    decay min(decay, (1 + n) / (10 + n)) at update n, so early averages forget the init."""

    def __init__(self, params, decay=0.999):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to(self):
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)

    @torch.no_grad()
    def swap(self):
        """Exchange the live and averaged weights (call twice to restore)."""
        for p, s in zip(self.params, self.shadow):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


def train_autoencoder(vae, images, steps, batch_size=32, lr=2e-3, kl_weight=1e-6, seed=0, init_logvar=-8.0,
                      fg_weight=0.0, progress=True):
    """Fit the autoencoder to uint8 images [N, 64, 64, 3]. Returns the last losses (rec, kl).

    The posterior's log-variance starts at `init_logvar` (the bias of its half of quant_conv;
    None keeps the current weights, for a further cycle): with the default init, std 1 noise on
    the latents drowns what the young encoder transmits, and a tiny KL weight takes thousands of
    steps to undo it. `fg_weight` > 0 weighs the pixels that differ from the image's corner
    (the shape) 1 + fg_weight times: the background is most of every image, the shape's
    colour is what the demo must keep. (bfloat16
    autocast does not pay here: on these flat-coloured images its backward pass is slower than
    float32's on a Zen CPU with AVX512-BF16.)
    """
    g = torch.Generator().manual_seed(seed)
    if init_logvar is not None:
        with torch.no_grad():
            vae.quant_conv.bias[vae.embed_dim :].fill_(init_logvar)
    opt, sched = _optimizer(vae.parameters(), lr, steps, warmup=min(50, steps // 10))
    vae.train()
    bar = tqdm(range(steps), desc="autoencoder", disable=not progress, mininterval=5)
    avg = None
    for _ in bar:
        idx = torch.randint(len(images), (batch_size,), generator=g)
        x = to_tensor(images[idx.numpy()])
        posterior = vae.encode(x)
        rec = vae.decode(posterior.sample(g))
        # Per-image sums, as the original: L1 (+ L2, which fits flat colours faster) over pixels,
        # KL over latents.
        err = rec - x
        weight = 1.0 + fg_weight * ((x - x[:, :, :1, :1]).abs().sum(dim=1, keepdim=True) > 0.1).float()
        rec_loss = (weight * (err.abs() + err.square())).sum(dim=(1, 2, 3)).mean()
        kl = posterior.kl().mean()
        loss = (rec_loss + kl_weight * kl) / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        cur = np.array([rec_loss.item() / x[0].numel(), kl.item()])
        avg = cur if avg is None else 0.98 * avg + 0.02 * cur
        bar.set_postfix(rec=f"{avg[0]:.4f}", kl=f"{avg[1]:.0f}", refresh=False)
    vae.eval()
    return tuple(avg)


@torch.no_grad()
def encode_dataset(vae, images, batch_size=250):
    """Posterior mean and std [N, 4, 8, 8] of every image."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        posterior = vae.encode(to_tensor(images[i : i + batch_size]))
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def latent_scale(mean, std, seed=0):
    """1 / std of latents sampled from the posteriors: unit-variance diffusion inputs."""
    g = torch.Generator().manual_seed(seed)
    z = mean + std * torch.randn(mean.shape, generator=g)
    return 1.0 / z.flatten().std().item()


def train_diffusion(model, latent_mean, latent_std, scenes, steps, batch_size=128, lr=1e-3, p_uncond=0.1, seed=0,
                    ema_decay=0.999, snr_gamma=None, progress=True, callback=None):
    """Train model.model (UNet) and model.cond_stage_model on the precomputed latent posteriors.

    Each step draws a batch of images, a posterior sample of each latent (scaled by
    model.scale_factor), a fresh caption of each scene (caption forms vary between epochs), a
    timestep and noise. The weights kept are an exponential moving average of the trained ones
    (`ema_decay`; 0 keeps the last weights). `snr_gamma` weighs each sample's loss by
    min(SNR_t, gamma) / SNR_t (Min-SNR weighting, Hang et al. 2023, with eps-prediction), which
    moves the effort from the nearly clean timesteps to the noisy ones where the image's
    layout is decided. `callback(step, ema)` runs after every step, with
    the live weights in the model. Returns the final smoothed loss.
    """
    g = torch.Generator().manual_seed(seed)
    rng = np.random.Generator(np.random.PCG64(seed))
    params = list(model.model.parameters()) + list(model.cond_stage_model.parameters())
    opt, sched = _optimizer(params, lr, steps, warmup=min(200, steps // 10))
    ema = EMA(params, ema_decay) if ema_decay else None
    model.model.train()
    model.cond_stage_model.train()
    ac = model.alphas_cumprod
    bar = tqdm(range(steps), desc="diffusion", disable=not progress, mininterval=5)
    avg = None
    for step in bar:
        idx = torch.randint(len(latent_mean), (batch_size,), generator=g)
        z0 = model.scale_factor * (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=g))
        drop = rng.random(batch_size) < p_uncond
        captions = ["" if d else random_caption(rng, scenes[i]) for d, i in zip(drop, idx.tolist())]
        t = torch.randint(len(ac), (batch_size,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        a = ac[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        pred = model.apply_model(zt, t, model.get_learned_conditioning(captions))
        if snr_gamma:
            snr = (a / (1 - a)).flatten()
            weight = snr.clamp(max=snr_gamma) / snr
            loss = (weight * (pred - eps).square().mean(dim=(1, 2, 3))).mean()
        else:
            loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update()
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        bar.set_postfix(loss=f"{avg:.4f}", refresh=False)
        if callback is not None:
            model.eval()
            callback(step + 1, ema)
            model.model.train()
            model.cond_stage_model.train()
    if ema is not None:
        ema.copy_to()
    model.eval()
    return avg
