"""Chat templates render exactly as transformers' apply_chat_template does."""

import pytest

from jlora.models.formats.chat_template import (
    compile_chat_template,
    render_chat_template,
    render_chat_template_spans,
)

# SmolLM2-135M-Instruct's template (tokenizer.chat_template in its GGUF)
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Meta-Llama-3-8B-Instruct's template
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
# Mistral-7B-Instruct-v0.1-style: refuses what it cannot express
MISTRAL = """{{ bos_token }}
{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{ '[INST] ' + message['content'] + ' [/INST]' }}
    {% elif message['role'] == 'assistant' %}
        {{ message['content'] + eos_token + ' ' }}
    {% else %}
        {{ raise_exception('Only user and assistant roles are supported!') }}
    {% endif %}
{% endfor %}"""
# tojson, strftime_now, loop controls and the tools/documents defaults
EXTRAS = """{% for m in messages %}{% if m['role'] == 'skip' %}{% continue %}{% endif %}
{{ m | tojson }}|{{ m['content'] | tojson(indent=1) }}
{% endfor %}tools={{ tools }} documents={{ documents }} year={{ strftime_now('%Y') }}"""
# generation blocks around the assistant's turns, as TRL/transformers recommend
CHATML_GEN = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + "
    "'<|im_end|>' }}{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}"
    "{% endif %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SYSTEM = [{"role": "system", "content": "Be terse. Ünïcödé 😀"}]
TURNS = [
    {"role": "user", "content": "  Hi there!\n\nWhat's 2+2?  "},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": 'And <b>3+3</b> & "x"?'},
]
CONVERSATIONS = [TURNS[:1], SYSTEM + TURNS, TURNS, SYSTEM + TURNS[:2]]


def hf_tokenizer(template):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=template,
    )


SPECIAL = {"bos_token": "<|begin_of_text|>", "eos_token": "</s>", "unk_token": "<unk>"}


@pytest.mark.peft
@pytest.mark.parametrize("template", [CHATML, LLAMA3, MISTRAL, EXTRAS, CHATML_GEN])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_renders_as_transformers(template, add_generation_prompt, conversation):
    messages = CONVERSATIONS[conversation]
    tok = hf_tokenizer(template)
    try:
        want = tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:  # the template's own raise_exception: ours must refuse too
        with pytest.raises(ValueError, match=f"failed to render.*{err}"):
            render_chat_template(
                template, messages, add_generation_prompt=add_generation_prompt, **SPECIAL
            )
        return
    got = render_chat_template(
        template, messages, add_generation_prompt=add_generation_prompt, **SPECIAL
    )
    assert got == want


@pytest.mark.peft
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_generation_spans_match_transformers(conversation):
    pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = CONVERSATIONS[conversation]
    (want,), (want_spans,) = render_jinja_template(
        [messages], chat_template=CHATML_GEN, return_assistant_tokens_mask=True, **SPECIAL
    )
    text, spans = render_chat_template_spans(CHATML_GEN, messages, **SPECIAL)
    assert (text, spans) == (want, want_spans)


def test_generation_spans_cover_assistant_turns():
    messages = SYSTEM + TURNS + [{"role": "assistant", "content": "6"}]
    text, spans = render_chat_template_spans(CHATML_GEN, messages)
    assert [text[a:b] for a, b in spans] == ["4.<|im_end|>", "6<|im_end|>"]
    assert text == render_chat_template(CHATML_GEN, messages)
    # a template without generation blocks has no spans
    assert render_chat_template_spans(CHATML, messages)[1] == []


def test_variables_and_raise_exception():
    out = render_chat_template(MISTRAL, TURNS[:2], bos_token="<s>", eos_token="</s>")
    # lstrip_blocks strips before {% %} only: the indentation before {{ }} stays
    assert out == "<s>\n        [INST]   Hi there!\n\nWhat's 2+2?   [/INST]\n        4.</s> \n"
    with pytest.raises(
        ValueError,
        match=r"from mistral\.jinja failed to render.*TemplateError: Conversation roles must",
    ):
        render_chat_template(MISTRAL, TURNS[1:], source="mistral.jinja", bos_token="<s>")


def test_errors_name_the_source():
    with pytest.raises(ValueError, match=r"from tokenizer_config\.json does not parse: line 2:"):
        compile_chat_template("ok\n{% for m in messages %}", "tokenizer_config.json")
    # sandboxed: no access to Python internals
    with pytest.raises(ValueError, match=r"from t\.jinja failed to render at line 1: Security"):
        render_chat_template("{{ messages.append(1) }}", [], source="t.jinja")
    with pytest.raises(ValueError, match=r"from <chat template> failed to render.*TypeError"):
        render_chat_template("{{ messages[0]['content'] + 1 }}", [{"content": "a"}])
