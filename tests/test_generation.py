"""Generation with modality-aware adapters: prefill + cached decode equals a full forward (routing covers
the prompt; later positions are text), greedy and beam search, on tiny Llama and Qwen2."""

from __future__ import annotations

import pytest
import torch

from moka_train.adapters import AdapterConfig, RoutingError, inject_adapters, set_routing
from moka_train.adapters.model import cache_offset
from moka_train.modality import Modality
from tests.helpers import (
    CACHE,
    VOCAB,
    cached_greedy_steps,
    position_ids,
    randomize_adapters,
    routing_batch,
    tiny_llama,
    tiny_qwen2,
)

BACKBONES = {"llama": tiny_llama, "qwen2": tiny_qwen2}
LAYOUTS = [
    [("text", 2), ("visual", 5), ("audio", 3), ("question", 4), ("text", 2)],
    [("text", 1), ("visual", 3), ("question", 2), ("text", 2)],
]
NEW_TOKENS = 5
# Exactly NEW_TOKENS greedy steps, so that runs with and without a cache can be compared token by token.
GENERATE = dict(
    max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, return_dict_in_generate=True
)


def adapted(backbone: str, method: str = "moka"):
    model = inject_adapters(BACKBONES[backbone](), AdapterConfig(method=method))
    randomize_adapters(model, std=0.5)
    ids, question, mask = routing_batch(LAYOUTS, pad_side="left")
    prompt = torch.randint(3, VOCAB, ids.shape, generator=torch.Generator().manual_seed(0)) * mask
    set_routing(model, ids, question)
    return model, prompt, mask


def full_forward_logits(model, sequences: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    mask = torch.cat([prompt_mask, torch.ones_like(sequences[:, prompt_mask.shape[1] :])], dim=1)
    with torch.no_grad():
        return model(input_ids=sequences, attention_mask=mask, position_ids=position_ids(mask)).logits


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("method", ["moka", "text_query", "uni_lora"])
def test_prefill_and_cached_decode_equal_full_forward(backbone, method):
    model, prompt, mask = adapted(backbone, method)
    step_logits, sequences, _ = cached_greedy_steps(model, prompt, mask, NEW_TOKENS)
    full = full_forward_logits(model, sequences, mask)
    length = prompt.shape[1]
    for step, logits in enumerate(step_logits):
        torch.testing.assert_close(logits, full[:, length - 1 + step], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_greedy_generate_matches_full_forward_and_no_cache(backbone):
    model, prompt, mask = adapted(backbone)
    kwargs = dict(attention_mask=mask, output_logits=True, **GENERATE)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    full = full_forward_logits(model, cached.sequences, mask)
    length = prompt.shape[1]
    for step, logits in enumerate(cached.logits):
        torch.testing.assert_close(logits, full[:, length - 1 + step], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(uncached.logits[step], logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_beam_search_matches_full_forward_and_no_cache(backbone):
    """Two beams expand the routing per sample; the best beam's score is the sum of its tokens'
    log-probabilities under a full forward (length_penalty 0)."""
    model, prompt, mask = adapted(backbone)
    beams = dict(num_beams=2, num_return_sequences=2, length_penalty=0.0, early_stopping=True)
    kwargs = dict(attention_mask=mask, output_scores=True, **beams, **GENERATE)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, rtol=1e-5, atol=1e-5)
    expanded_mask = mask.repeat_interleave(2, dim=0)
    set_routing(model, *[t.repeat_interleave(2, dim=0) for t in routing_batch(LAYOUTS, pad_side="left")[:2]])
    full = full_forward_logits(model, cached.sequences, expanded_mask)
    length = prompt.shape[1]
    log_probs = full[:, length - 1 : -1].log_softmax(-1)
    generated = cached.sequences[:, length:]
    sums = log_probs.gather(-1, generated.unsqueeze(-1)).squeeze(-1).sum(-1)
    torch.testing.assert_close(cached.sequences_scores, sums, rtol=1e-4, atol=1e-4)


def test_chunked_prefill_is_refused():
    model, prompt, mask = adapted("llama")
    half = prompt.shape[1] // 2
    with pytest.raises(RoutingError, match="routing covers"):
        model(input_ids=prompt[:, :half], attention_mask=mask[:, :half], use_cache=True)
    set_routing(model, None)
    with torch.no_grad():
        out = model(input_ids=prompt[:, :half], attention_mask=mask[:, :half], use_cache=True)
    ids, question, _ = routing_batch(LAYOUTS, pad_side="left")
    set_routing(model, ids, question)
    with pytest.raises(RoutingError, match="chunked prefill"):
        model(input_ids=prompt[:, half:], attention_mask=mask, use_cache=True, **{CACHE: getattr(out, CACHE)})
    # generate's own chunked prefill fails on its first chunk, and says why
    with pytest.raises(RoutingError, match="routing covers .*chunked prefill, e.g. generate's prefill_chunk_size"):
        model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=2, do_sample=False, prefill_chunk_size=4)


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_the_cache_offset_is_read_under_either_name_of_the_cache(keyword):
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` and stopped passing ``cache_position``; a
    decode step must still be told from a prefill whichever name reaches the pre-hook."""
    model, prompt, mask = adapted("llama")
    with torch.no_grad():
        out = model(input_ids=prompt, attention_mask=mask, use_cache=True)
    cache = getattr(out, CACHE)
    assert cache_offset({keyword: cache}) == prompt.shape[1]
    assert cache_offset({"cache_position": torch.tensor([6, 7])}) == 6
    assert cache_offset({keyword: ((torch.zeros(1, 2, 9, 4), torch.zeros(1, 2, 9, 4)),)}) == 9  # legacy tuple
    assert cache_offset({}) == 0


def test_single_token_prompt_is_not_a_decode_step():
    """A one-token prefill at position 0 uses its routed modality (not text), unlike the official code's
    ``x.size(1) == 1`` test."""
    model = inject_adapters(tiny_llama(), AdapterConfig(method="moka"))
    randomize_adapters(model, std=0.5)
    token = torch.tensor([[7]])
    set_routing(model, torch.tensor([[int(Modality.VISUAL)]]), torch.tensor([[False]]))
    with torch.no_grad():
        as_visual = model(input_ids=token, use_cache=True).logits
        set_routing(model, None)
        as_text = model(input_ids=token, use_cache=True).logits
    assert not torch.allclose(as_visual, as_text, atol=1e-4)
