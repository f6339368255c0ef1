"""ouro-generate's prompt handling: ChatML prompts render as the SFT data did; bad requests exit 2."""

from __future__ import annotations

import pytest
import torch

from ouro_train.cli.infer import chat_prompt, generate_main, left_pad
from ouro_train.data.sft import render_conversation, special_ids
from ouro_train.data.tokenizer import train_bpe_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    docs = ["the quick brown fox jumps over the lazy dog", "def f(x): return x + 1", "user assistant system"] * 20
    return train_bpe_tokenizer(docs, vocab_size=300)


def test_chat_prompt_is_the_sft_rendering_up_to_the_assistant_turn(tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is <|im_end|> x?"}]
    answer = {"role": "assistant", "content": "a token"}
    rendered, _ = render_conversation(tokenizer, [*messages, answer], special_ids(tokenizer, False, "t"))
    prompt = chat_prompt(tokenizer, messages)
    assert rendered[: len(prompt)].tolist() == prompt
    ids = special_ids(tokenizer, False, "t")
    assert prompt.count(ids.im_end) == 2  # the user's "<|im_end|>" text did not become the token
    with pytest.raises(ValueError, match="role"):
        chat_prompt(tokenizer, [{"role": "robot", "content": "x"}])


def test_left_padding():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == torch.long


def test_bad_requests_exit_2_with_a_message(tmp_path, capsys):
    assert generate_main([str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    assert "error:" in capsys.readouterr().err
