"""Our tokenizer and chat template against transformers' on the same files."""

import json

import pytest

from rl_engine.policy.presets import CHAT_TEMPLATE, write_char_tokenizer
from rl_engine.policy.tokenizer import Tokenizer

QWEN_STYLE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

MESSAGES = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2*3?"}],
]


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, QWEN_STYLE])
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_chat_template_matches_transformers(tmp_path, template, gen_prompt):
    from transformers import AutoTokenizer

    write_char_tokenizer(str(tmp_path))
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg))
    ours = Tokenizer.from_pretrained(str(tmp_path))
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    for msgs in MESSAGES:
        text = ours.apply_chat_template(msgs, add_generation_prompt=gen_prompt)
        assert text == ref.apply_chat_template(msgs, add_generation_prompt=gen_prompt, tokenize=False)
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
        assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text), skip_special_tokens=True)


def test_char_tokenizer_roundtrip_and_eos(tmp_path):
    write_char_tokenizer(str(tmp_path))
    tok = Tokenizer.from_pretrained(str(tmp_path))
    text = "Q: 17 + 25 = ?\nA: 42."
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.eos_token_ids == [tok.token_to_id("<|eos|>")]


def test_missing_template_and_bad_message_are_clear(tmp_path):
    write_char_tokenizer(str(tmp_path))
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    tok = Tokenizer.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"content": "no role"}])
    del cfg["chat_template"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="chat_template"):
        Tokenizer.from_pretrained(str(tmp_path)).apply_chat_template(MESSAGES[0])
