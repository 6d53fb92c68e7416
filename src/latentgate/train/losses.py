"""All token losses from ONE teacher-forced forward pass over the same answer positions.

TF CE over the whole answer, first-token CE, K-token CE and KD all read `answer_logits` (gathered through the
contract's index map), so they cannot aim at different tokens (the predecessor's K-token loss aimed at BOS while
the first-token loss aimed at the first answer word). KD compares student and teacher at aligned answer
positions, each found through its own index map, so right-padding can never put a pad position in the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentgate.config import StageConfig
from latentgate.schema import Loss, Stage


@dataclass
class LossOutput:
    total: torch.Tensor
    raw: dict[str, torch.Tensor]
    weighted: dict[str, torch.Tensor]
    stats: dict[str, float]


def compute_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    st: StageConfig,
    teacher_logits: torch.Tensor | None = None,
    eos_id: int | None = None,
) -> LossOutput:
    logits = logits.float()
    logp = logits.log_softmax(-1)
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, T]
    maskf = mask.float()
    tf = (nll * maskf).sum() / maskf.sum()
    first = nll[:, 0].mean()  # every answer has at least one token (EOS is appended)
    kmask = maskf * (torch.arange(mask.shape[1], device=mask.device) < st.k).float().unsqueeze(0)
    kce = (nll * kmask).sum() / kmask.sum()
    raw = {Loss.TF: tf, Loss.FIRST: first, Loss.KCE: kce}
    if teacher_logits is not None and st.kd_weight > 0:
        tau = st.kd_temperature
        t_logp = (teacher_logits.float() / tau).log_softmax(-1)
        s_logp = (logits / tau).log_softmax(-1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)  # [B, T]
        raw[Loss.KD] = (kl * maskf).sum() / maskf.sum() * tau**2
    else:
        raw[Loss.KD] = torch.zeros((), device=logits.device)
    weights = {Loss.TF: st.tf_weight, Loss.FIRST: st.first_token_ce_weight, Loss.KCE: st.kce_weight,
               Loss.KD: st.kd_weight}
    weighted = {k: raw[k] * weights[k] for k in Loss.TERMS}
    total = sum(weighted.values())
    return LossOutput(total, raw, weighted, token_stats(logits.detach(), targets, mask, eos_id))


@torch.no_grad()
def token_stats(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, eos_id: int | None) -> dict:
    """first_acc / top-5 on the first answer token; teacher-forced predicted answer length (up to the first
    predicted EOS); token_diversity = distinct first-token predictions / batch size (collapse shows as -> 0)."""
    first_pred = logits[:, 0].argmax(-1)
    top5 = logits[:, 0].topk(min(5, logits.shape[-1]), dim=-1).indices
    stats = {
        Stage.FIRST_ACC: (first_pred == targets[:, 0]).float().mean().item(),
        Stage.FIRST_ACC_TOP5: (top5 == targets[:, :1]).any(-1).float().mean().item(),
        Stage.TOKEN_DIVERSITY: first_pred.unique().numel() / first_pred.numel(),
    }
    if eos_id is not None:
        preds = logits.argmax(-1)
        is_eos = preds == eos_id
        t = preds.shape[1]
        first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(preds[:, 0], t))
        stats[Stage.ANSWER_LENGTH_AVG] = first_eos.float().mean().item()
    return stats


def scheduled_inputs(pred_ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, p_gold: float,
                     generator: torch.Generator) -> torch.Tensor:
    """Answer inputs for scheduled sampling: each gold token is kept with probability p_gold, otherwise replaced
    by the model's own teacher-forced prediction for that slot."""
    keep = torch.rand(targets.shape, generator=generator).to(targets.device) < p_gold
    return torch.where(keep | ~mask, targets, pred_ids)


def p_gold_at(step: int, total_steps: int, floor: float) -> float:
    """Anneal p(gold) linearly from 1.0 to `floor` over the stage."""
    return max(floor, 1.0 - (1.0 - floor) * step / max(1, total_steps))
