"""The preference losses of the trainers: PRDP's reward-difference regression and Diffusion-DPO.
(SFT is plain noise-prediction MSE, `torch.nn.functional.mse_loss`, in its trainer.)"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

RewardNormalization = Literal["per_prompt", "none"]
# Added to a prompt's reward std (as GRPO-style per-prompt advantages do): a prompt whose samples all score alike
# (up to float noise) gets differences near 0, not noise blown up to unit size.
REWARD_STD_EPS = 1e-4


def normalize_rewards(
    rewards: torch.Tensor, normalization: RewardNormalization = "per_prompt", eps: float = REWARD_STD_EPS
) -> torch.Tensor:
    """Rewards (P, B) of P prompts with B samples each, standardised within each prompt: minus the prompt's mean,
    divided by its standard deviation over the B samples (+ eps). "none" returns them as they are.

    PRDP only sees reward differences within a prompt, so this makes its targets R/beta independent of the reward
    model's scale (GAN-RM logits, HPSv2 scores, any multiple of them) and of how far apart a prompt's samples are."""
    if normalization == "none":
        return rewards
    if normalization != "per_prompt":
        raise ValueError(f"reward normalization must be 'per_prompt' or 'none', got {normalization!r}")
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True, correction=0)
    return (rewards - mean) / (std + eps)


def _pairwise(values: torch.Tensor) -> torch.Tensor:
    """(P, B) -> (P, B, B) with [p, i, j] = v_i - v_j: the pairs within each prompt, never across prompts."""
    return values.unsqueeze(-1) - values.unsqueeze(-2)


def _with_prompt_axis(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(tensor.unsqueeze(0) for tensor in tensors)


def prdp_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    rewards: torch.Tensor,
    beta: float,
    clip_eps: float,
    reward_normalization: RewardNormalization = "none",
) -> torch.Tensor:
    """PRDP's loss (Deng et al. 2024, the authors' formula) for P prompts with B trajectories of T steps each.

    log_probs, old_log_probs, ref_log_probs: (P, B, T) per-step log p(x_{t-1} | x_t, c) under the model being trained,
    the model that sampled (theta_old) and the frozen reference; rewards: (P, B). A leading P may be left out.
    With lr = logp - logp_ref and lr_old = logp_old - logp_ref per step, lr_clip = clip(lr, lr_old - eps,
    lr_old + eps); both are averaged over T. For every ordered pair (i, j) of trajectories of the same prompt,
    D = lr_i - lr_j, D_clip likewise, R = r_i - r_j, and the pair's loss is max((D - R/beta)^2, (D_clip - R/beta)^2).
    The result is the mean over all pairs with R > 0 of all prompts (0, still differentiable, if there are none).
    `reward_normalization="per_prompt"` first standardises the rewards within each prompt (`normalize_rewards`);
    the default "none" is the authors' loss on the rewards as given.

    Scale convention: log-probabilities are means over latent elements (see ganrm_diffusers.generation.sampling) and ratios are
    means over the T steps, so beta and eps are per latent element and per step. Summing either would rescale them.
    """
    if log_probs.ndim == 2:
        log_probs, old_log_probs, ref_log_probs, rewards = _with_prompt_axis(
            log_probs, old_log_probs, ref_log_probs, rewards
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
    rewards = normalize_rewards(rewards, reward_normalization)
    target = _pairwise(rewards.to(ratio.dtype)) / beta
    pair_losses = torch.maximum((_pairwise(ratio) - target) ** 2, (_pairwise(clipped) - target) ** 2)
    preferred = _pairwise(rewards) > 0
    return (pair_losses * preferred).sum() / preferred.sum().clamp(min=1)


class RegressionScales(NamedTuple):
    target: float  # mean |R / beta| over the pairs the loss uses
    log_ratio_gap: float  # mean |D| (difference of the pair's log-ratios) over the same pairs


def regression_scales(log_ratios: torch.Tensor, rewards: torch.Tensor, beta: float) -> RegressionScales:
    """How big PRDP's regression targets are next to what they regress: log_ratios (P, B) are the trajectories'
    log-ratios to the reference (means over steps), rewards (P, B) as the loss sees them. A target far above the
    log-ratio gaps the model shows means beta (or the reward scale) is off by that much."""
    if log_ratios.ndim == 1:
        log_ratios, rewards = _with_prompt_axis(log_ratios, rewards)
    gaps, targets = _pairwise(log_ratios.detach().double()), _pairwise(rewards.detach().double()) / beta
    preferred = targets > 0
    if not preferred.any():
        return RegressionScales(0.0, 0.0)
    return RegressionScales(float(targets[preferred].mean()), float(gaps[preferred].abs().mean()))


class DPOLoss(NamedTuple):
    loss: torch.Tensor
    implicit_accuracy: torch.Tensor  # the share of pairs whose winner the model already favours more than the reference


# Written once: the trainers' --beta help and `ganrm train --help` quote it.
DPO_BETA_CONVENTION = (
    "the paper's beta: loss = -log sigmoid(-beta/2 * ((mse_w - ref_mse_w) - (mse_l - ref_mse_l))), mse the mean "
    "over latent elements; 2000-5000 in the paper, 5000 in its official launchers. diffusers' research script "
    "train_diffusion_dpo.py calls beta/2 its --beta_dpo (its 2500 = our 5000)"
)


def diffusion_dpo_loss(model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor, beta: float) -> DPOLoss:
    """Diffusion-DPO (Wallace et al. 2024) on a batch of 2N: the N winners first, then their N losers, noised with
    the same noise and timesteps. model_pred and ref_pred are the trained and reference UNet's predictions, target
    the training target (the noise, or the velocity for v-prediction).

    beta: DPO_BETA_CONVENTION.
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
