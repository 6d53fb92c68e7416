"""The prefix contract: the ONE place that lays out what the LM reads.

Latent (student) path:  [BOS] [latent x M] [anchor tokens] -> answer tokens + EOS
Text (teacher) path:    [BOS] "context : ... question : ... answer :" -> answer tokens + EOS

Training losses, probes, evaluation and generation all build their inputs here, so the layout cannot drift
between them (the predecessor applied a different anchor, chat header and gain at eval). Sequences are
right-padded; every consumer reads answer logits through the explicit index map `answer_pos`, where
`logits[i, answer_pos[i, t]]` predicts answer token t. Answers are tokenized WITHOUT BOS and WITH EOS appended.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

IGNORE = -100
TEXT_TEMPLATE = "context : {context} question : {question} {anchor}"
BUDGET_TEMPLATE = "question : {question} context : {context} {anchor}"


@dataclass(frozen=True)
class PrefixContract:
    num_latents: int
    anchor_ids: tuple[int, ...]
    eos_id: int
    pad_id: int
    bos_id: int | None
    anchor: str

    @classmethod
    def from_tokenizer(cls, tokenizer, num_latents: int, anchor: str) -> "PrefixContract":
        anchor_ids = tuple(tokenizer(anchor, add_special_tokens=False)["input_ids"])
        if not anchor_ids:
            raise ValueError(f"anchor {anchor!r} tokenizes to nothing")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(num_latents, anchor_ids, tokenizer.eos_token_id, pad, tokenizer.bos_token_id, anchor)

    @property
    def prefix_len(self) -> int:
        return (self.bos_id is not None) + self.num_latents + len(self.anchor_ids)

    def layout(self) -> list[tuple[str, int]]:
        """Segments of the latent prefix, in order: what the golden test and the logged contract show."""
        segs = [("bos", 1)] if self.bos_id is not None else []
        return segs + [("latent", self.num_latents), ("anchor", len(self.anchor_ids)), ("answer", -1)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layout"] = self.layout()
        d["prefix_len"] = self.prefix_len
        d["text_template"] = TEXT_TEMPLATE
        return d


@dataclass
class PrefixBatch:
    """What the LM is fed, plus the index map to the answer logits."""

    inputs_embeds: torch.Tensor  # [B, S, H]
    attention_mask: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S], HF convention (unshifted), IGNORE outside the answer
    answer_pos: torch.Tensor  # [B, T] position whose logits predict answer token t
    answer_targets: torch.Tensor  # [B, T] gold answer ids (EOS included), pad elsewhere
    answer_mask: torch.Tensor  # [B, T] bool
    segments: list[tuple[str, int]]


def encode_answers(tokenizer, answers: list[str]) -> list[list[int]]:
    """Answer ids without BOS and with EOS appended: the same targets for TF, first-token and K-token losses."""
    ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    return [list(a) + [tokenizer.eos_token_id] for a in ids]


def _pad_answers(answer_ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    t_max = max(len(a) for a in answer_ids)
    targets = torch.full((len(answer_ids), t_max), pad_id, dtype=torch.long)
    mask = torch.zeros((len(answer_ids), t_max), dtype=torch.bool)
    for i, a in enumerate(answer_ids):
        targets[i, : len(a)] = torch.tensor(a)
        mask[i, : len(a)] = True
    return targets.to(device), mask.to(device)


def build_latent_batch(
    contract: PrefixContract,
    embed: torch.nn.Embedding,
    latents: torch.Tensor,
    answer_inputs: list[list[int]] | torch.Tensor | None = None,
    answer_targets: list[list[int]] | None = None,
) -> PrefixBatch:
    """Latent prefix (+ answer, right-padded). `answer_inputs` are the ids fed after the prefix (gold ids for
    teacher forcing, or a gold/predicted mix for scheduled sampling); `answer_targets` are always the gold ids.
    With no answers this is the generation prefix, identical to the training prefix by construction."""
    b, m, _ = latents.shape
    if m != contract.num_latents:
        raise ValueError(f"got {m} latents, contract says {contract.num_latents}")
    device = latents.device
    parts, segments = [], []
    if contract.bos_id is not None:
        parts.append(embed(torch.full((b, 1), contract.bos_id, device=device)))
        segments.append(("bos", 1))
    parts.append(latents.to(embed.weight.dtype))
    segments.append(("latent", m))
    parts.append(embed(torch.tensor(contract.anchor_ids, device=device)).unsqueeze(0).expand(b, -1, -1))
    segments.append(("anchor", len(contract.anchor_ids)))
    p = contract.prefix_len
    if answer_targets is None and answer_inputs is None:
        embeds = torch.cat(parts, dim=1)
        empty = torch.zeros((b, 0), dtype=torch.long, device=device)
        return PrefixBatch(embeds, torch.ones((b, p), dtype=torch.long, device=device),
                           torch.full((b, p), IGNORE, device=device), empty, empty, empty.bool(), segments)
    answer_targets = answer_targets if answer_targets is not None else answer_inputs
    targets, mask = _pad_answers(answer_targets, contract.pad_id, device)
    if answer_inputs is None or isinstance(answer_inputs, list):
        inputs, _ = _pad_answers(answer_inputs or answer_targets, contract.pad_id, device)
    else:
        inputs = answer_inputs
    t_max = targets.shape[1]
    # The concatenated ids are prefix + answer + EOS, exactly what a `labels=` forward would see; the logits at
    # the final EOS position predict nothing.
    parts.append(embed(inputs))
    segments.append(("answer", t_max))
    embeds = torch.cat(parts, dim=1)
    attn = torch.cat([torch.ones((b, p), dtype=torch.long, device=device), mask.long()], dim=1)
    answer_pos = (p - 1 + torch.arange(t_max, device=device)).unsqueeze(0).expand(b, -1)
    return PrefixBatch(embeds, attn, _hf_labels(targets, mask, answer_pos, embeds.shape[1]), answer_pos,
                       targets, mask, segments)


def _hf_labels(targets, mask, answer_pos, seq_len) -> torch.Tensor:
    """HF-style labels such that `model(..., labels=labels).loss` is the teacher-forced answer CE:
    logits at answer_pos[i,t] predict targets[i,t], and HF reads labels[i, answer_pos[i,t] + 1]."""
    b = targets.shape[0]
    labels = torch.full((b, seq_len + 1), IGNORE, dtype=torch.long, device=targets.device)
    labels.scatter_(1, answer_pos + 1, torch.where(mask, targets, IGNORE))
    return labels[:, :seq_len]


def text_prompt(context: str, question: str, anchor: str, budget_tokens: int | None = None, tokenizer=None) -> str:
    """The teacher's prompt. With `budget_tokens`, the token-budget baseline: the question is always kept and the
    context is cut so question + context fit in the budget (the predecessor dropped the question)."""
    if budget_tokens is None:
        return TEXT_TEMPLATE.format(context=context, question=question, anchor=anchor)
    q_len = len(tokenizer(question, add_special_tokens=False)["input_ids"])
    room = max(0, budget_tokens - q_len)
    ctx_ids = tokenizer(context, add_special_tokens=False)["input_ids"][:room]
    cut = tokenizer.decode(ctx_ids, skip_special_tokens=True) if ctx_ids else ""
    return BUDGET_TEMPLATE.format(question=question, context=cut, anchor=anchor)


def build_text_batch(
    contract: PrefixContract,
    tokenizer,
    embed: torch.nn.Embedding,
    prompts: list[str],
    answer_ids: list[list[int]] | None = None,
    left_pad: bool = False,
) -> PrefixBatch:
    """Text path: [BOS] prompt (+ answer). Right-padded for training/KD (index map to answer logits);
    left-padded for generation, so every row's next token sits at the last position."""
    device = embed.weight.device
    bos = [contract.bos_id] if contract.bos_id is not None else []
    prompt_ids = [bos + ids for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]  # one call
    b = len(prompts)
    if answer_ids is None:
        s = max(len(p) for p in prompt_ids)
        ids = torch.full((b, s), contract.pad_id, dtype=torch.long)
        attn = torch.zeros((b, s), dtype=torch.long)
        for i, p in enumerate(prompt_ids):
            sl = slice(s - len(p), s) if left_pad else slice(0, len(p))
            ids[i, sl] = torch.tensor(p)
            attn[i, sl] = 1
        ids, attn = ids.to(device), attn.to(device)
        empty = torch.zeros((b, 0), dtype=torch.long, device=device)
        return PrefixBatch(embed(ids), attn, torch.full_like(ids, IGNORE), empty, empty, empty.bool(),
                           [("text", -1)])
    targets, mask = _pad_answers(answer_ids, contract.pad_id, device)
    t_max = targets.shape[1]
    seqs = [p + a for p, a in zip(prompt_ids, answer_ids)]  # prompt + answer + EOS: the concatenated ids
    s = max(len(x) for x in seqs)
    ids = torch.full((b, s), contract.pad_id, dtype=torch.long)
    attn = torch.zeros((b, s), dtype=torch.long)
    for i, x in enumerate(seqs):
        ids[i, : len(x)] = torch.tensor(x)
        attn[i, : len(x)] = 1
    starts = torch.tensor([len(p) - 1 for p in prompt_ids]).unsqueeze(1)
    # clamp: rows with short answers index past their end only at masked (ignored) slots
    answer_pos = (starts + torch.arange(t_max).unsqueeze(0)).clamp(max=s - 1).to(device)
    ids, attn = ids.to(device), attn.to(device)
    labels = _hf_labels(targets, mask, answer_pos, s)
    return PrefixBatch(embed(ids), attn, labels, answer_pos, targets, mask, [("text", -1), ("answer", t_max)])
