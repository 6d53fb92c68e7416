"""The prefix contract: the ONE place that lays out what the LM reads.

Latent (student) path:  [head] [latent x M] [anchor] -> answer
Text (teacher) path:    [head] "context : ... question : ..." [anchor] -> answer

`plain` format: head = [BOS] where the tokenizer itself starts text with it (Llama-3) or the LM was trained so
(the builtin LM), else nothing (SmolLM2's BOS is `<|im_start|>`, a chat-turn opener); anchor = " answer :".
`chat` format: head and anchor are the tokenizer's chat template split around the user message (system prompt,
user header | end of turn, assistant header). Both paths use the same head and anchor ids, by construction.

Answers are the ids the LM sees AFTER the anchor (`" Paris"` after a plain prompt, not `"Paris"` on its own), plus
the end token only when `answer_end=eos`: an LM is never scored on an end token it would not emit. With chat prompts
the end token is the one the template closes an assistant turn with (`end_of_turn_id`), else the tokenizer's EOS.
Generation stops at any end-token id (tokenizer + generation_config + end of turn) or at a token containing a stop
string.

Training losses, probes, evaluation and generation all build their inputs here, so the layout cannot drift
between them (the predecessor applied a different anchor, chat header and gain at eval). Sequences are
right-padded; every consumer reads answer logits through the explicit index map `answer_pos`, where
`logits[i, answer_pos[i, t]]` predicts answer token t.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import torch

from latentgate.errors import ConfigError

IGNORE = -100
TEXT_BODY = "context : {context} question : {question}"
BUDGET_BODY = "question : {question} context : {context}"
_SLOT = "\x00LATENTGATE_SLOT\x00"  # stands for the user message when the chat template is split
_REPLY = "\x00LATENTGATE_REPLY\x00"  # stands for the assistant's reply when the end-of-turn token is read


@dataclass(frozen=True)
class PrefixContract:
    num_latents: int
    head_ids: tuple[int, ...]
    anchor_ids: tuple[int, ...]
    anchor_text: str  # the text the anchor ids come from (plain: " answer :"; chat: end of turn + assistant header)
    answer_sep: str  # text between the anchor and the answer, as the LM would see it
    end_id: int | None  # appended to answer targets (answer_end=eos), else None
    stop_ids: tuple[int, ...]  # generation stops at any of these
    stop_strings: tuple[str, ...]
    pad_id: int
    bos_id: int | None
    anchor: str
    prompt_format: str

    @classmethod
    def from_tokenizer(cls, tokenizer, num_latents: int, anchor: str, prompt_format: str = "plain",
                       answer_end: str = "eos", stop_strings=(), generation_config=None,
                       add_bos: bool | None = None) -> "PrefixContract":
        if prompt_format == "chat":
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("model.prompt_format=chat, but the tokenizer has no chat template")
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": _SLOT}], tokenize=False,
                                                     add_generation_prompt=True)
            head_text, anchor_text = rendered.split(_SLOT)
            head = tuple(tokenizer(head_text, add_special_tokens=False)["input_ids"])
            sep = ""
        else:
            bos = tokenizer.bos_token_id
            if add_bos is None:  # what the tokenizer does itself
                add_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
            head = (bos,) if add_bos and bos is not None else ()
            anchor_text, sep = " " + anchor, " "
        anchor_ids = tuple(tokenizer(anchor_text, add_special_tokens=False)["input_ids"])
        if not anchor_ids:
            raise ValueError(f"anchor {anchor_text!r} tokenizes to nothing")
        end_ids = end_token_ids(tokenizer, generation_config)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_ids[0]
        turn_end = end_of_turn_id(tokenizer) if prompt_format == "chat" else None
        if turn_end is None:
            turn_end = tokenizer.eos_token_id
        end_id = turn_end if answer_end == "eos" else None
        stops = tuple(sorted(set(end_ids) | {turn_end} - {None} | set(_ids_containing(tokenizer, stop_strings))))
        return cls(num_latents, head, anchor_ids, anchor_text, sep, end_id, stops, tuple(stop_strings), pad,
                   tokenizer.bos_token_id, anchor, prompt_format)

    @classmethod
    def for_config(cls, cfg, tokenizer, generation_config=None) -> "PrefixContract":
        m = cfg.model
        return cls.from_tokenizer(tokenizer, m.num_latents, m.anchor, m.prompt_format, m.answer_end,
                                  tuple(m.stop_strings), generation_config,
                                  add_bos=True if cfg.base.name == "builtin" else None)  # trained with BOS-led text

    @property
    def prefix_len(self) -> int:
        return len(self.head_ids) + self.num_latents + len(self.anchor_ids)

    def layout(self) -> list[tuple[str, int]]:
        """Segments of the latent prefix, in order: what the golden test and the logged contract show."""
        segs = [("head", len(self.head_ids))] if self.head_ids else []
        return segs + [("latent", self.num_latents), ("anchor", len(self.anchor_ids)), ("answer", -1)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layout"] = self.layout()
        d["prefix_len"] = self.prefix_len
        d["text_template"] = TEXT_BODY
        return d


def end_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every id that ends a turn: the tokenizer's EOS and all of generation_config.eos_token_id (Llama-3 and many
    instruct models list several)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    extra = getattr(generation_config, "eos_token_id", None)
    ids += extra if isinstance(extra, (list, tuple)) else [extra] if extra is not None else []
    if not ids:
        raise ValueError("the tokenizer has no end token and generation_config lists none")
    return list(dict.fromkeys(ids))


def end_of_turn_id(tokenizer) -> int | None:
    """The token the chat template closes an assistant turn with (ChatML `<|im_end|>`, Gemma `<end_of_turn>`,
    Llama-3 `<|eot_id|>`), which need not be the tokenizer's EOS: a user + assistant exchange is rendered and the first
    token after the reply is read. None when the template puts no special token there (the caller uses EOS)."""
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _REPLY}]
    rendered = tokenizer.apply_chat_template(turns, tokenize=False)
    if _REPLY not in rendered:
        return None
    after = tokenizer(rendered.split(_REPLY, 1)[1], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return after[0] if after and after[0] in special else None


def _ids_containing(tokenizer, stop_strings) -> list[int]:
    """Vocabulary ids whose text contains a stop string (e.g. every token with a newline in a BPE vocabulary)."""
    if not stop_strings:
        return []
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return [i for i, t in enumerate(texts) if any(s in t for s in stop_strings)]


@dataclass
class PrefixBatch:
    """What the LM is fed, plus the index map to the answer logits."""

    inputs_embeds: torch.Tensor  # [B, S, H]
    attention_mask: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S], HF convention (unshifted), IGNORE outside the answer
    answer_pos: torch.Tensor  # [B, T] position whose logits predict answer token t
    answer_targets: torch.Tensor  # [B, T] gold answer ids (end id included when answer_end=eos), pad elsewhere
    answer_mask: torch.Tensor  # [B, T] bool
    segments: list[tuple[str, int]]


def answer_logits(lm, batch: PrefixBatch) -> torch.Tensor:
    """Logits at the answer positions only: [B, T, V]. The LM's last hidden states are gathered at `answer_pos`
    first and only those B x T rows go through the LM head (transformers' 2-D `logits_to_keep`), so the logits grow
    with the answer length, never with the prompt's: at a 128k vocabulary, keeping every row from the earliest
    answer position to the end of a right-padded text batch cost tens of GiB at eval batch 200."""
    out = lm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, use_cache=False,
             logits_to_keep=batch.answer_pos)
    if out.logits.shape[:2] != batch.answer_pos.shape:  # a model whose forward ignores a 2-D logits_to_keep
        raise ConfigError(f"{type(lm).__name__} returned logits of shape {tuple(out.logits.shape)} for "
                          f"{tuple(batch.answer_pos.shape)} answer positions",
                          "use a causal LM whose forward takes a 2-D logits_to_keep (transformers >= 5)")
    return out.logits


def encode_answers(contract: PrefixContract, tokenizer, answers: list[str]) -> list[list[int]]:
    """The answer ids the LM sees after the anchor, without BOS, plus the end id when the contract has one: the
    same targets for TF, first-token and K-token losses, KD, NLL and first-token accuracy. Tokenized together with
    the anchor text and cut after it, so merges at the boundary are the ones the LM would see."""
    anchor = list(contract.anchor_ids)
    joint = tokenizer([contract.anchor_text + contract.answer_sep + a for a in answers],
                      add_special_tokens=False)["input_ids"]
    end = [contract.end_id] if contract.end_id is not None else []
    out = []
    for a, ids in zip(answers, joint):
        if list(ids[: len(anchor)]) == anchor:
            ids = list(ids[len(anchor) :])
        else:  # a merge across the boundary (rare): the answer as the LM would start it on its own, said aloud
            ids = tokenizer(contract.answer_sep + a, add_special_tokens=False)["input_ids"]
            warnings.warn(f"latentgate: answer {a!r} merges with the anchor {contract.anchor_text!r} when tokenized "
                          "after it; its target ids are tokenized on their own, which is not what the LM reads (fix: "
                          "end the anchor, model.anchor or the chat template's assistant header, on a token boundary)",
                          stacklevel=2)
        if not ids:
            raise ValueError(f"answer {a!r} tokenizes to nothing")
        out.append(list(ids) + end)
    return out


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
    if contract.head_ids:
        parts.append(embed(torch.tensor(contract.head_ids, device=device)).unsqueeze(0).expand(b, -1, -1))
        segments.append(("head", len(contract.head_ids)))
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
    # The concatenated ids are prefix + answer (+ end id), exactly what a `labels=` forward would see; the logits at
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


def text_prompt(context: str, question: str, budget_tokens: int | None = None, tokenizer=None) -> str:
    """The teacher's prompt body (the contract adds head and anchor). With `budget_tokens`, the token-budget
    baseline: the question is always kept and the context is cut so question + context fit in the budget (the
    predecessor dropped the question)."""
    if budget_tokens is None:
        return TEXT_BODY.format(context=context, question=question)
    q_len = len(tokenizer(question, add_special_tokens=False)["input_ids"])
    room = max(0, budget_tokens - q_len)
    ctx_ids = tokenizer(context, add_special_tokens=False)["input_ids"][:room]
    cut = tokenizer.decode(ctx_ids, skip_special_tokens=True) if ctx_ids else ""
    return BUDGET_BODY.format(question=question, context=cut)


def build_text_batch(
    contract: PrefixContract,
    tokenizer,
    embed: torch.nn.Embedding,
    prompts: list[str],
    answer_ids: list[list[int]] | None = None,
    left_pad: bool = False,
) -> PrefixBatch:
    """Text path: [head] prompt body [anchor] (+ answer). Right-padded for training/KD (index map to answer
    logits); left-padded for generation, so every row's next token sits at the last position."""
    device = embed.weight.device
    head, anchor = list(contract.head_ids), list(contract.anchor_ids)
    prompt_ids = [head + ids + anchor for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
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
    seqs = [p + a for p, a in zip(prompt_ids, answer_ids)]  # prompt + answer (+ end id): the concatenated ids
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
