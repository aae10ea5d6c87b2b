"""The user turn of a sample: an instruction template with the media placeholders and ``{question}``.

A ``Prompt`` renders the chat turns of one sample and the character span of the question inside the user
turn, which the collator maps to tokens (MokA's cross-attention keys). The official MokA prompts are the
presets; data configs may give their own template.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_SYSTEM = "You are a helpful assistant."
QUESTION_FIELD = "{question}"

# The official MokA user turns (moka_reference.md §3, benchmarks.md), without the <question_start/end>
# markers: the question span is a character span here. The question of AVQA-style prompts includes the
# "Please answer this question: " lead-in, as the official markers enclose it.
AUDIO_VISUAL = (
    "This is a video:\n<video_start><video><video_end>\nThis is an audio:\n<audio_start><audio><audio_end>\n{question}"
)
VISUAL = "This is an image:\n<image_start><image><image_end>\n{question}"
VIDEO = "This is a video:\n<video_start><video><video_end>\n{question}"
AUDIO = "This is an audio:\n<audio_start><audio><audio_end>\n{question}"
SPEECH = "This is a speech clip:\n<speech_start><speech><speech_end>\n{question}"


@dataclass(frozen=True)
class Prompt:
    """``template``: the user turn, with ``{question}`` once (other text is literal, braces included).
    ``question_prefix``: put before the question inside the span (``"Please answer this question: "``).
    ``system``: the system turn, or None for none."""

    template: str
    system: str | None = DEFAULT_SYSTEM
    question_prefix: str = ""

    def __post_init__(self) -> None:
        if self.template.count(QUESTION_FIELD) != 1:
            raise ValueError(f"a prompt template needs {QUESTION_FIELD} exactly once, got {self.template!r}")

    def user_turn(self, question: str) -> tuple[str, tuple[int, int]]:
        """The user turn's text and the question's character span inside it."""
        before, after = self.template.split(QUESTION_FIELD)
        question = self.question_prefix + question
        return before + question + after, (len(before), len(before) + len(question))

    def messages(self, question: str, answer: str | None = None) -> tuple[list[dict[str, str]], tuple[int, int]]:
        """The chat turns (system, user, and the assistant's answer when given) and the question span."""
        user, span = self.user_turn(question)
        turns = [{"role": "system", "content": self.system}] if self.system is not None else []
        turns.append({"role": "user", "content": user})
        if answer is not None:
            turns.append({"role": "assistant", "content": answer})
        return turns, span
