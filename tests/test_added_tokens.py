"""Trainable rows for added special tokens on a frozen, unresized embedding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moka_train.models.added_tokens import AddedTokenEmbedding
from tests.helpers import tiny_llama


def test_added_rows_replace_the_base_lookup_and_train_alone():
    torch.manual_seed(0)
    base = nn.Embedding(10, 4)
    # 3 lies inside the matrix (a padded vocabulary row), 10 and 11 past it.
    embedding = AddedTokenEmbedding(base, [10, 3, 11])
    with torch.no_grad():
        embedding.weight.copy_(torch.arange(12.0).view(3, 4))
    ids = torch.tensor([[1, 10, 3], [11, 0, 9]])
    out = embedding(ids)
    torch.testing.assert_close(out[0, 0], base.weight[1].detach())
    torch.testing.assert_close(out[0, 1], torch.arange(0.0, 4.0))
    torch.testing.assert_close(out[0, 2], torch.arange(4.0, 8.0))
    torch.testing.assert_close(out[1, 0], torch.arange(8.0, 12.0))
    torch.testing.assert_close(out[1, 2], base.weight[9].detach())
    out.sum().backward()
    assert base.weight.grad is None
    # Row k's gradient counts the positions holding added token k: 10 once, 3 once, 11 once.
    torch.testing.assert_close(embedding.weight.grad, torch.ones(3, 4))


def test_new_rows_start_at_the_mean_embedding():
    base = nn.Embedding(6, 3)
    embedding = AddedTokenEmbedding(base, [6, 7])
    torch.testing.assert_close(embedding.weight.detach(), base.weight.detach().mean(0).repeat(2, 1))


def test_tied_lm_head_is_left_alone():
    model = tiny_llama()
    vocab = model.config.vocab_size
    head = model.lm_head.weight.clone()
    embedding = AddedTokenEmbedding(model.get_input_embeddings(), [vocab, vocab + 1])
    inputs = embedding(torch.tensor([[5, vocab, vocab + 1]]))
    logits = model(inputs_embeds=inputs).logits
    assert logits.shape[-1] == vocab
    assert torch.equal(model.lm_head.weight, head)
    assert [n for n, p in embedding.named_parameters() if p.requires_grad] == ["weight"]


def test_token_ids_are_saved_and_checked():
    embedding = AddedTokenEmbedding(nn.Embedding(10, 4), [10, 11])
    assert embedding.state_dict()["token_ids"].tolist() == [10, 11]
    embedding.check_token_ids([10, 11], "ckpt")
    with pytest.raises(ValueError, match=r"ckpt: the added tokens had ids \[11, 12\] when saved"):
        embedding.check_token_ids([11, 12], "ckpt")


def test_bad_ids():
    with pytest.raises(ValueError, match="distinct"):
        AddedTokenEmbedding(nn.Embedding(10, 4), [10, 10])
    embedding = AddedTokenEmbedding(nn.Embedding(10, 4), [10])
    with pytest.raises(ValueError, match="token id 12 is outside the vocabulary"):
        embedding(torch.tensor([[12]]))
