"""The preference losses against separate, naive transcriptions of their published formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ganrm_diffusers.training.losses import diffusion_dpo_loss, prdp_loss


def prdp_loss_by_loops(logp, logp_old, logp_ref, rewards, beta, eps):
    """The PRDP authors' loss written out pair by pair and step by step (shared/notes/algorithms.md)."""
    prompts, trajectories, steps = len(logp), len(logp[0]), len(logp[0][0])
    total, pairs = 0.0, 0
    for p in range(prompts):
        ratio, ratio_clipped = [], []
        for i in range(trajectories):
            per_step, per_step_clipped = [], []
            for t in range(steps):
                lr = logp[p][i][t] - logp_ref[p][i][t]
                lr_old = logp_old[p][i][t] - logp_ref[p][i][t]
                per_step.append(lr)
                per_step_clipped.append(min(max(lr, lr_old - eps), lr_old + eps))
            ratio.append(sum(per_step) / steps)
            ratio_clipped.append(sum(per_step_clipped) / steps)
        for i in range(trajectories):
            for j in range(trajectories):
                reward_gap = rewards[p][i] - rewards[p][j]
                if reward_gap > 0:
                    unclipped = (ratio[i] - ratio[j] - reward_gap / beta) ** 2
                    clipped = (ratio_clipped[i] - ratio_clipped[j] - reward_gap / beta) ** 2
                    total += max(unclipped, clipped)
                    pairs += 1
    return total / pairs


def random_prdp_inputs(prompts=3, trajectories=4, steps=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logp_ref = -1.0 + 0.1 * torch.randn(prompts, trajectories, steps, generator=generator, dtype=torch.float64)
    logp_old = logp_ref + 1e-3 * torch.randn(prompts, trajectories, steps, generator=generator, dtype=torch.float64)
    logp = logp_old + 1e-3 * torch.randn(prompts, trajectories, steps, generator=generator, dtype=torch.float64)
    rewards = torch.randn(prompts, trajectories, generator=generator, dtype=torch.float64)
    rewards[0, 1] = rewards[0, 2]  # a tie: that pair counts in neither direction
    return logp, logp_old, logp_ref, rewards


@pytest.mark.parametrize("eps", [5e-4, 1e-6, 1.0])  # some steps clipped, nearly all clipped, none clipped
def test_prdp_loss_matches_the_authors_formula(eps):
    logp, logp_old, logp_ref, rewards = random_prdp_inputs()
    beta = 0.5
    expected = prdp_loss_by_loops(logp.tolist(), logp_old.tolist(), logp_ref.tolist(), rewards.tolist(), beta, eps)
    loss = prdp_loss(logp, logp_old, logp_ref, rewards, beta=beta, clip_eps=eps)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_prdp_loss_pairs_only_within_a_prompt():
    logp, logp_old, logp_ref, rewards = random_prdp_inputs(prompts=2)
    together = prdp_loss(logp, logp_old, logp_ref, rewards, beta=0.5, clip_eps=1e-3)
    # Two prompts at once = the pair-weighted mean of each prompt alone (no pair crosses prompts).
    alone = [prdp_loss(logp[p], logp_old[p], logp_ref[p], rewards[p], beta=0.5, clip_eps=1e-3) for p in range(2)]
    pair_counts = [int((rewards[p, :, None] > rewards[p, None, :]).sum()) for p in range(2)]
    weighted = sum(loss * count for loss, count in zip(alone, pair_counts, strict=True)) / sum(pair_counts)
    assert together.item() == pytest.approx(weighted.item(), rel=1e-10)
    # Rewards of one prompt shifted by a constant change nothing: only differences within a prompt matter.
    shifted = rewards.clone()
    shifted[1] += 100.0
    assert prdp_loss(logp, logp_old, logp_ref, shifted, beta=0.5, clip_eps=1e-3).item() == pytest.approx(
        together.item(), rel=1e-9
    )


def test_prdp_loss_gradient_reaches_only_the_trained_log_probs():
    logp, logp_old, logp_ref, rewards = random_prdp_inputs()
    logp.requires_grad_()
    logp_old.requires_grad_()
    prdp_loss(logp, logp_old, logp_ref, rewards, beta=0.5, clip_eps=1.0).backward()
    assert logp.grad.abs().sum() > 0
    assert logp_old.grad is None
    # Where every step is clipped and the clipped error is the larger one, the pair passes no gradient.
    equal = torch.full((1, 2, 3), -1.0, requires_grad=True)
    old = torch.full((1, 2, 3), -1.0)
    old[0, 0] += 1.0  # every step of both trajectories lies outside lr_old +- eps, so clip(lr) is constant
    old[0, 1] -= 1.0
    loss = prdp_loss(equal, old, torch.full((1, 2, 3), -1.0), torch.tensor([[1.0, 0.0]]), beta=1e3, clip_eps=1e-6)
    loss.backward()
    assert torch.equal(equal.grad, torch.zeros_like(equal))


def test_prdp_loss_without_preferred_pairs_is_zero_and_differentiable():
    logp = torch.zeros(2, 3, 4, requires_grad=True)
    loss = prdp_loss(logp, logp.detach(), logp.detach(), torch.ones(2, 3), beta=1.0, clip_eps=0.1)
    loss.backward()
    assert loss.item() == 0.0 and logp.grad is not None


def test_prdp_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(P, B, T\)"):
        prdp_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(3, 2), 1.0, 0.1)


def dpo_loss_of_diffusers_research_script(model_pred, ref_pred, target, beta_dpo):
    """examples/research_projects/diffusion_dpo/train_diffusion_dpo.py, loss_type "sigmoid", transcribed."""
    model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    ref_loss = F.mse_loss(ref_pred.float(), target.float(), reduction="none")
    ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape))))
    ref_losses_w, ref_losses_l = ref_loss.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
    logits = ref_diff - model_diff
    loss = -1 * F.logsigmoid(beta_dpo * logits).mean()
    implicit_acc = (logits > 0).sum().float() / logits.size(0)
    implicit_acc += 0.5 * (logits == 0).sum().float() / logits.size(0)
    return loss, implicit_acc


def dpo_loss_of_the_paper(model_pred, ref_pred, target, beta):
    """Wallace et al.: -log sigmoid(-beta/2 ((|e_w - e_th(x_w)|^2 - |e_w - e_ref(x_w)|^2) - (same for l)))."""
    half = len(target) // 2

    def error(prediction, rows):
        return ((target[rows] - prediction[rows]) ** 2).flatten(1).mean(dim=1)

    winners, losers = slice(0, half), slice(half, None)
    inside = (error(model_pred, winners) - error(ref_pred, winners)) - (
        error(model_pred, losers) - error(ref_pred, losers)
    )
    return -torch.log(torch.sigmoid(-beta / 2 * inside)).mean()


def test_diffusion_dpo_loss_matches_diffusers_research_script_and_paper():
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(6, 4, 8, 8, generator=generator)  # 3 winners then 3 losers, shared noise in practice
    ref_pred = target + 0.5 * torch.randn(6, 4, 8, 8, generator=generator)
    model_pred = (ref_pred + 0.05 * torch.randn(6, 4, 8, 8, generator=generator)).requires_grad_()
    beta = 5000.0
    result = diffusion_dpo_loss(model_pred, ref_pred, target, beta=beta)

    # The loss computes in float32, and beta / 2 = 2500 multiplies the float32 rounding of the MSE differences: its
    # value is the formula's to about 1e-4 (measured: up to 6e-5 over seeds), whichever order the sums take. So the
    # paper's formula is evaluated in float64 as the truth; a convention error (beta against beta / 2, a sign,
    # winners and losers swapped) moves the loss by 1e-1 or more.
    truth = dpo_loss_of_the_paper(model_pred.double(), ref_pred.double(), target.double(), beta).item()
    assert result.loss.item() == pytest.approx(truth, rel=1e-3)
    script_loss, script_accuracy = dpo_loss_of_diffusers_research_script(model_pred, ref_pred, target, beta / 2)
    assert script_loss.item() == pytest.approx(truth, rel=1e-3)  # the script's beta_dpo is our beta / 2
    assert result.implicit_accuracy.item() == pytest.approx(script_accuracy.item())
    result.loss.backward()
    assert model_pred.grad.abs().sum() > 0


def test_diffusion_dpo_loss_is_log2_at_the_reference():
    pred = torch.randn(4, 4, 8, 8)
    result = diffusion_dpo_loss(pred, pred.clone(), torch.randn(4, 4, 8, 8), beta=5000.0)
    assert result.loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-6)


def test_diffusion_dpo_loss_needs_winner_loser_halves():
    with pytest.raises(ValueError, match="winners then losers"):
        diffusion_dpo_loss(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 4), beta=1.0)
