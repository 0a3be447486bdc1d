"""SmolLM2-135M-Instruct's own chat template (ChatML, with its default system prompt when none is given): exactly
the assistant turns, each with its <|im_end|>, carry labels (issue 21.1)."""

from __future__ import annotations

from sapling.data.chat import render_chat


def test_smollm2_template_labels_exactly_the_assistant_turns(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.chat_template
    for conversation in (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does len() return?"},
         {"role": "assistant", "content": "The number of items."}, {"role": "user", "content": "And sorted()?"},
         {"role": "assistant", "content": "A new sorted list."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    ):
        ids, mask = render_chat(conversation, tok)
        runs, cur = [], []
        for i, m in zip(ids, mask):
            if m:
                cur.append(i)
            elif cur:
                runs.append(tok.decode(cur))
                cur = []
        runs += [tok.decode(cur)] if cur else []
        assert runs == [m["content"] + "<|im_end|>" for m in conversation if m["role"] == "assistant"]
        assert tok.decode(ids) == tok.apply_chat_template(conversation, tokenize=False)
