"""Chat rendering and assistant-only labels (issue 21.1): for each template style (Llama 3, Qwen 2.5 ChatML with
its default system prompt, Gemma, Mistral [INST], a template with {% generation %} markers, and one that
rewrites its headers per conversation), exactly the assistant turns' tokens, end-of-turn token included and
the next header excluded, carry labels."""

from __future__ import annotations

import pytest

from sapling.data.chat import normalize_messages, render_chat
from sapling.errors import DataError

CONVERSATION = [
    {"role": "system", "content": "You answer questions about Python."},
    {"role": "user", "content": "What does len() return?"},
    {"role": "assistant", "content": "The number of items in a container."},
    {"role": "user", "content": "And sorted()?"},
    {"role": "assistant", "content": "A new sorted list."},
]

NL = "'\\n'"
TEMPLATES = {
    # (template, special tokens, what each assistant turn's labelled text must be)
    "llama3": ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>' + "
               f"{NL} + {NL} + m['content'] + '<|eot_id|>' }}}}{{% endfor %}}{{% if add_generation_prompt %}}"
               f"{{{{ '<|start_header_id|>assistant<|end_header_id|>' + {NL} + {NL} }}}}{{% endif %}}",
               ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "{}<|eot_id|>"),
    "qwen2.5": ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system' + " + NL + " + 'You are helpful.' + "
                "'<|im_end|>' + " + NL + " }}{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + " + NL +
                " + m['content'] + '<|im_end|>' + " + NL + " }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|im_start|>assistant' + " + NL + " }}{% endif %}",
                ["<|im_start|>", "<|im_end|>"], "{}<|im_end|>"),
    "gemma": ("{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else "
              "m['role'] %}{{ '<start_of_turn>' + role + " + NL + " + m['content'] + '<end_of_turn>' + " + NL +
              " }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model' + " + NL + " }}{% endif %}",
              ["<bos>", "<start_of_turn>", "<end_of_turn>"], "{}<end_of_turn>"),
    "mistral": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
                "' [/INST]' }}{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}{% endif %}"
                "{% endfor %}", ["<s>", "[INST]", "[/INST]"], " {}<|endoftext|>"),
    "generation-markers": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + " + NL + " }}{% if m['role'] == "
                           "'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ " + NL +
                           " }}{% else %}{{ m['content'] + '<|im_end|>' + " + NL + " }}{% endif %}{% endfor %}"
                           "{% if add_generation_prompt %}{{ '<|im_start|>assistant' + " + NL + " }}{% endif %}",
                           ["<|im_start|>", "<|im_end|>"], "{}<|im_end|>"),
    # the header counts the conversation's turns, so prefixes render differently: the fallback span search
    "rewriting": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + (loop.index | string) + '/' + "
                  "(messages | length | string) + " + NL + " + m['content'] + '<|im_end|>' + " + NL + " }}"
                  "{% endfor %}", ["<|im_start|>", "<|im_end|>"], "{}<|im_end|>"),
}


def _tokenizer(base_dir, template: str, specials: list[str]):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.bos_token = specials[0]
    tok.chat_template = template
    return tok


def _labelled_runs(tok, ids: list[int], mask: list[bool]) -> list[str]:
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


@pytest.mark.parametrize("style", TEMPLATES)
def test_exactly_the_assistant_turns_carry_labels(style, tokenizer_dir):
    template, specials, expected = TEMPLATES[style]
    tok = _tokenizer(tokenizer_dir, template, specials)
    ids, mask = render_chat(CONVERSATION, tok)
    assert len(ids) == len(mask) and tok.decode(ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    want = [expected.format(m["content"]) for m in CONVERSATION if m["role"] == "assistant"]
    assert _labelled_runs(tok, ids, mask) == want
    ids_all, mask_all = render_chat(CONVERSATION, tok, loss_on="all")
    assert ids_all == ids and all(mask_all)


def test_a_tokenizer_without_a_template_is_refused_with_the_key(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.chat_template = None
    with pytest.raises(DataError, match="data.chat_template"):
        render_chat(CONVERSATION, tok)
    template, specials, _ = TEMPLATES["qwen2.5"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    ids, mask = render_chat(CONVERSATION, tok, chat_template=template)  # given explicitly instead
    assert any(mask) and not all(mask)


def test_sharegpt_rows_and_bad_rows():
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    assert normalize_messages(row, "conversations") == [{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": "hello"}]
    with pytest.raises(DataError, match="data.messages_field"):
        normalize_messages({"text": "x"})
    with pytest.raises(DataError, match=r"messages\[0\] lacks"):
        normalize_messages({"messages": [{"speaker": "a", "text": "b"}]})


# The templates as the models publish them in tokenizer_config.json (Meta-Llama-3-8B-Instruct, gemma-2-*-it with
# its role checks, Mistral-7B-Instruct-v0.1, Qwen2.5-*-Instruct's path without tools), transcribed. Gemma and
# Mistral refuse a system turn, so theirs is the 4-message user/assistant conversation.
PUBLISHED = {
    "llama3": ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
               "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
               "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
               "{{ content }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
               ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "{}<|eot_id|>", True),
    "gemma2": ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
               "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
               "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
               "user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set "
               "role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + "
               "'\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
               "{{'<start_of_turn>model\\n'}}{% endif %}",
               ["<bos>", "<start_of_turn>", "<end_of_turn>"], "{}<end_of_turn>", False),
    "mistral-v0.1": ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
                     "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
                     "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' "
                     "+ message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ "
                     "message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and assistant "
                     "roles are supported!') }}{% endif %}{% endfor %}",
                     ["<s>", "[INST]", "[/INST]"], "{}<|endoftext|>", False),
    "qwen2.5": ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
                "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You "
                "are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if "
                "(message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == "
                "\"assistant\") %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' "
                "}}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
                ["<|im_start|>", "<|im_end|>"], "{}<|im_end|>", True),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_templates_label_exactly_the_assistant_turns(name, tokenizer_dir):
    template, specials, expected, system = PUBLISHED[name]
    tok = _tokenizer(tokenizer_dir, template, specials)
    conversation = CONVERSATION if system else CONVERSATION[1:]
    ids, mask = render_chat(conversation, tok)
    assert tok.decode(ids) == tok.apply_chat_template(conversation, tokenize=False)
    want = [expected.format(m["content"]) for m in conversation if m["role"] == "assistant"]
    assert _labelled_runs(tok, ids, mask) == want
