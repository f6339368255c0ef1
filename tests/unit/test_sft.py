import json

import numpy as np
import pytest

from data_tools.cli import main as ouro_data
from ouro_train.data.demo_corpus import demo_documents
from ouro_train.data.loader import ShardedLoader
from ouro_train.data.manifest import DataError, load_manifest
from ouro_train.data.sft import ChatTokens, render_conversation, special_ids
from ouro_train.data.source import TokenSource
from ouro_train.data.tokenizer import save_tokenizer, train_bpe_tokenizer

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2? <|im_end|> fake"},
    {"role": "assistant", "content": "4", "reasoning": "two plus two"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(demo_documents()[:20], vocab_size=400)


def test_assistant_turns_alone_are_in_the_loss(tokenizer):
    ids = special_ids(tokenizer, need_thinking=True, where="t")
    tokens, mask = render_conversation(tokenizer, CHAT, ids, thinking="keep")
    assert tokens.shape == mask.shape
    decoded_loss = tokenizer.decode(tokens[mask == 1].tolist(), skip_special_tokens=False)
    assert decoded_loss == "<think>\ntwo plus two\n</think>\n4<|im_end|>\n6<|im_end|>\n"
    # User text that looks like a special token stays text: exactly one real <|im_end|> per turn.
    assert int((tokens == ids.im_end).sum()) == len(CHAT)
    assert tokens[-1] == ids.eos and mask[-1] == 0
    kept_len = len(tokens)
    tokens, mask = render_conversation(tokenizer, CHAT, ids, thinking="drop")
    assert len(tokens) < kept_len and ids.think not in tokens.tolist()


def test_bad_conversations(tokenizer):
    ids = special_ids(tokenizer, need_thinking=False, where="t")
    with pytest.raises(DataError, match="no assistant turn"):
        render_conversation(tokenizer, [{"role": "user", "content": "hi"}], ids)
    with pytest.raises(DataError, match="message 0 needs role"):
        render_conversation(tokenizer, [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}], ids)
    no_think = ChatTokens(ids.im_start, ids.im_end, ids.eos, None, None)
    with pytest.raises(DataError, match="lacks <think>"):
        render_conversation(tokenizer, CHAT, no_think, thinking="keep")


def test_sft_shards_feed_masked_batches(tokenizer, tmp_path):
    tok_path = save_tokenizer(tokenizer, tmp_path / "tok.json")
    chats = tmp_path / "chat.jsonl"
    chats.write_text("\n".join(json.dumps({"messages": CHAT}) for _ in range(6)))
    assert (
        ouro_data(
            [
                "sft",
                str(chats),
                "--source",
                "chat",
                "--tokenizer",
                str(tok_path),
                "--out",
                str(tmp_path / "sft"),
            ]
        )
        == 0
    )
    manifest = load_manifest(tmp_path / "sft")
    assert manifest.kind == "sft" and manifest.documents == 6
    source = TokenSource("chat", tmp_path / "sft", seq_len=32, seed=0, model_vocab_size=400)
    batch = next(ShardedLoader([source], [1.0], global_batch_size=2, micro_batch_size=2))
    ids = special_ids(tokenizer, True, "t")
    # The loss mask marks positions whose label is an assistant token.
    window_mask = np.stack([source.window(0).mask[1:], source.window(1).mask[1:]])
    assert batch["loss_mask"].numpy().tolist() == window_mask.astype(bool).tolist()
    labels_in_loss = batch["labels"][batch["loss_mask"]]
    assert ids.im_start not in labels_in_loss.tolist() and ids.eos not in labels_in_loss.tolist()
    assert ouro_data(["inspect", str(tmp_path / "sft"), "--verify", "--tokenizer", str(tok_path)]) == 0
