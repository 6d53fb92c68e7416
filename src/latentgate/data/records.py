"""The one record type every stage consumes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """One extractive QA example. `answers` holds every reference; the first is the primary (training) target."""

    id: str
    context: str
    question: str
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...] = field(default=())

    @property
    def answer(self) -> str:
        return self.answers[0]

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "context": self.context,
            "question": self.question,
            "answers": list(self.answers),
            "answer_starts": list(self.answer_starts),
        }
