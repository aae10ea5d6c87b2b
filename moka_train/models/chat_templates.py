"""Chat templates: the backbone tokenizer's own, or the Llama-2 frame the official MokA runs used.

A template is a Jinja string that ``tokenizer.apply_chat_template`` renders. ``chat_template`` in the model
config picks one: ``tokenizer`` (the template shipped with the checkpoint: Llama-3 and Qwen2/2.5 instruct
models have one), ``llama2_official`` (the official audio-visual frame, below), ``llama2_chat`` (Llama-2-chat's
own format, which the official visual-text code sets) or ``chatml`` (Qwen's turn markup, which the demo
tokenizer ships). Rendering happens once per sample in the collator, which then maps character spans to tokens.
"""

from __future__ import annotations

# The prompt frame of the official MokA code, byte for byte (moka_reference.md §3 and its released
# predictions): "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]" + "{answer}</s>". It differs from
# the Llama-2-chat tokenizer's own template, which writes " {answer} </s>" (spaces around the answer).
# Later turns open with "<s>[INST] " again, as Llama-2 chat does; a system message may only come first.
LLAMA2_OFFICIAL = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not loop.first -%}{{ raise_exception('a system message may only be the first message') }}{%- endif -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ (bos_token or '') + '[INST] ' }}"
    "{%- if loop.index0 == 1 and messages[0]['role'] == 'system' -%}"
    "{{ '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' }}"
    "{%- endif -%}"
    "{{ message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ message['content'] + eos_token }}"
    "{%- else -%}{{ raise_exception('unknown role ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# Llama-2-chat's own format, which the official visual-text code sets on its tokenizer (VisualText/train/train.py
# and its eval scripts; the same as the chat template of Meta's Llama-2-chat checkpoints): each turn's content
# stripped, the system message folded into the first user turn, and the answer framed by spaces:
# "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]" + " {answer} </s>". No generation prompt: the
# prompt ends at " [/INST]", and the answer's leading space is the first supervised character.
LLAMA2_CHAT = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('turns must alternate user / assistant, after an optional first system message') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system is not none -%}"
    "{%- set content = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + message['content'] -%}"
    "{%- else -%}{%- set content = message['content'] -%}{%- endif -%}"
    "{{ (bos_token or '') + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{%- else -%}"
    "{{ ' ' + message['content'].strip() + ' ' + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# Qwen2's turn markup, without its default system prompt (the sample's system turn, if any, is used).
CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

CHAT_TEMPLATES = {"llama2_official": LLAMA2_OFFICIAL, "llama2_chat": LLAMA2_CHAT, "chatml": CHATML}
USE_TOKENIZER_TEMPLATE = "tokenizer"


def set_chat_template(tokenizer, choice: str) -> None:
    """Give ``tokenizer`` the template named by ``choice`` (``tokenizer`` keeps its own)."""
    if choice == USE_TOKENIZER_TEMPLATE:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "chat_template=tokenizer, but this tokenizer ships no chat template (base models and Llama-2 "
                f"checkpoints often do not); choose one of {sorted(CHAT_TEMPLATES)}"
            )
        return
    if choice not in CHAT_TEMPLATES:
        raise ValueError(
            f"unknown chat_template {choice!r}; choose {USE_TOKENIZER_TEMPLATE!r} or one of {sorted(CHAT_TEMPLATES)}"
        )
    tokenizer.chat_template = CHAT_TEMPLATES[choice]
