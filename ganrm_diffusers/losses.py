"""The preference losses of the trainers: PRDP's reward-difference regression and Diffusion-DPO.
(SFT is plain noise-prediction MSE, `torch.nn.functional.mse_loss`, in its trainer.)"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def prdp_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    rewards: torch.Tensor,
    beta: float,
    clip_eps: float,
) -> torch.Tensor:
    """PRDP's loss (Deng et al. 2024, the authors' formula) for P prompts with B trajectories of T steps each.

    log_probs, old_log_probs, ref_log_probs: (P, B, T) per-step log p(x_{t-1} | x_t, c) under the model being trained,
    the model that sampled (theta_old) and the frozen reference; rewards: (P, B). A leading P may be left out.
    With lr = logp - logp_ref and lr_old = logp_old - logp_ref per step, lr_clip = clip(lr, lr_old - eps,
    lr_old + eps); both are averaged over T. For every ordered pair (i, j) of trajectories of the same prompt,
    D = lr_i - lr_j, D_clip likewise, R = r_i - r_j, and the pair's loss is max((D - R/beta)^2, (D_clip - R/beta)^2).
    The result is the mean over all pairs with R > 0 of all prompts (0, still differentiable, if there are none).

    Scale convention: log-probabilities are means over latent elements (see ganrm_diffusers.sampling) and ratios are
    means over the T steps, so beta and eps are per latent element and per step. Summing either would rescale them.
    """
    if log_probs.ndim == 2:
        log_probs, old_log_probs, ref_log_probs, rewards = (
            tensor.unsqueeze(0) for tensor in (log_probs, old_log_probs, ref_log_probs, rewards)
        )
    if not (log_probs.shape == old_log_probs.shape == ref_log_probs.shape and log_probs.shape[:2] == rewards.shape):
        raise ValueError(
            f"log_probs, old_log_probs, ref_log_probs must be (P, B, T) and rewards (P, B); got "
            f"{tuple(log_probs.shape)}, {tuple(old_log_probs.shape)}, {tuple(ref_log_probs.shape)}, {tuple(rewards.shape)}"
        )
    ratio = log_probs - ref_log_probs
    old_ratio = (old_log_probs - ref_log_probs).detach()
    clipped = torch.clamp(ratio, old_ratio - clip_eps, old_ratio + clip_eps)
    ratio, clipped = ratio.mean(dim=-1), clipped.mean(dim=-1)

    def pairwise(values: torch.Tensor) -> torch.Tensor:  # (P, B) -> (P, B, B) with [p, i, j] = v_i - v_j
        return values.unsqueeze(-1) - values.unsqueeze(-2)

    target = pairwise(rewards.to(ratio.dtype)) / beta
    pair_losses = torch.maximum((pairwise(ratio) - target) ** 2, (pairwise(clipped) - target) ** 2)
    preferred = pairwise(rewards) > 0
    return (pair_losses * preferred).sum() / preferred.sum().clamp(min=1)


class DPOLoss(NamedTuple):
    loss: torch.Tensor
    implicit_accuracy: torch.Tensor  # the share of pairs whose winner the model already favours more than the reference


def diffusion_dpo_loss(model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor, beta: float) -> DPOLoss:
    """Diffusion-DPO (Wallace et al. 2024) on a batch of 2N: the N winners first, then their N losers, noised with
    the same noise and timesteps. model_pred and ref_pred are the trained and reference UNet's predictions, target
    the training target (the noise, or the velocity for v-prediction).

    loss = -log sigmoid(-beta / 2 * ((mse_w - ref_mse_w) - (mse_l - ref_mse_l))), mse the per-sample mean over
    elements of the squared error. beta follows the paper and the official code (2000 to 5000, 5000 in their
    launchers); diffusers' research script names beta/2 its `beta_dpo`.
    """
    if len(model_pred) % 2 or model_pred.shape != ref_pred.shape or model_pred.shape != target.shape:
        raise ValueError(
            f"need winners then losers, all of one even batch shape; got model {tuple(model_pred.shape)}, "
            f"reference {tuple(ref_pred.shape)}, target {tuple(target.shape)}"
        )

    def per_sample_mse(prediction: torch.Tensor) -> torch.Tensor:
        errors = F.mse_loss(prediction.float(), target.float(), reduction="none")
        return errors.mean(dim=tuple(range(1, errors.ndim)))

    model_w, model_l = per_sample_mse(model_pred).chunk(2)
    ref_w, ref_l = per_sample_mse(ref_pred.detach()).chunk(2)
    margin = (ref_w - model_w) - (ref_l - model_l)  # > 0: the winner improved more than the loser
    loss = -F.logsigmoid(beta / 2 * margin).mean()
    return DPOLoss(loss, (margin > 0).float().mean() + 0.5 * (margin == 0).float().mean())
