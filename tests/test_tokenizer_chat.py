"""Chat templates: the built-ins against the strings their models' published templates
produce, the model's own template rendered as Hugging Face renders it, and fallbacks."""
from __future__ import annotations

import logging

import pytest

from dllama_node.common.errors import UsageError
from dllama_node.tokenizer import ChatTemplate, chat_template_by_name, load_tokenizer
from dllama_node.tokenizer.chat import (BUILTINS, builtin_name_for_vocab, template_for_vocab)
from tests.test_tokenizer_helpers import bpe_metadata, bpe_oracle, spm_metadata, spm_processor

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2+2?"},
]

# Written out from the published templates (meta-llama/Llama-2-7b-chat-hf,
# meta-llama/Meta-Llama-3-8B-Instruct, HuggingFaceH4/zephyr-7b-beta and
# TinyLlama/TinyLlama-1.1B-Chat-v1.0, ChatML as in Qwen and OpenHermes).
EXPECTED = {
    "llama2": ("<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi! [/INST] Hello. </s>"
               "<s>[INST] What is 2+2? [/INST]"),
    "llama3": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse."
               "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "zephyr": ("<|system|>\nYou are terse.</s>\n<|user|>\nHi!</s>\n<|assistant|>\nHello.</s>\n"
               "<|user|>\nWhat is 2+2?</s>\n<|assistant|>\n"),
    "chatml": ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
               "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nWhat is 2+2?"
               "<|im_end|>\n<|im_start|>assistant\n"),
}
EXPECTED_NO_PROMPT = {
    "llama2": EXPECTED["llama2"],
    "llama3": EXPECTED["llama3"][:-len("<|start_header_id|>assistant<|end_header_id|>\n\n")],
    "zephyr": EXPECTED["zephyr"][:-len("<|assistant|>\n")],
    "chatml": EXPECTED["chatml"][:-len("<|im_start|>assistant\n")],
}


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_renders_the_published_format(name):
    t = chat_template_by_name(name)
    assert t.render(CONVERSATION) == EXPECTED[name]
    assert t.render(CONVERSATION, add_generation_prompt=False) == EXPECTED_NO_PROMPT[name]


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_equals_transformers_rendering(name):
    """The same template source through transformers' apply_chat_template."""
    from transformers import PreTrainedTokenizerFast

    source, bos, eos = BUILTINS[name]
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe_oracle(), bos_token=bos or None,
                                 eos_token=eos)
    for gen in (True, False):
        theirs = hf.apply_chat_template(CONVERSATION, chat_template=source, tokenize=False,
                                        add_generation_prompt=gen)
        assert chat_template_by_name(name).render(CONVERSATION, gen) == theirs


def test_llama2_rejects_roles_that_do_not_alternate():
    with pytest.raises(UsageError, match="Conversation roles must alternate"):
        chat_template_by_name("llama2").render([{"role": "user", "content": "a"},
                                                {"role": "user", "content": "b"}])


def test_by_name_is_case_insensitive_and_unknown_names_fail():
    assert chat_template_by_name(" Llama3 ").name == "llama3"
    with pytest.raises(UsageError, match="'vicuna' is unknown: expected one of llama2"):
        chat_template_by_name("vicuna")


def test_bad_message_shape_is_a_usage_error():
    with pytest.raises(UsageError, match="chat message 0: expected a dict with 'role'"):
        chat_template_by_name("chatml").render([{"content": "no role"}])


@pytest.mark.parametrize("specials,name", [
    ({"<s>", "</s>"}, "llama2"),
    ({"<|begin_of_text|>", "<|eot_id|>"}, "llama3"),
    ({"<|im_start|>", "<|im_end|>", "<|endoftext|>"}, "chatml"),
    ({"<s>", "</s>", "<|user|>", "<|assistant|>"}, "zephyr"),
])
def test_builtin_chosen_by_vocab(specials, name):
    assert builtin_name_for_vocab(specials) == name


HF_FEATURES = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
    "{% generation %}[{{ m['role'] }}]{% endgeneration %}{{ m['content'] | tojson }}\n"
    "{% endfor %}{{ strftime_now('%Y') | length }}{{ bos_token }}|{{ eos_token }}"
)


def test_model_template_uses_hf_helpers():
    t = template_for_vocab(HF_FEATURES, {"<s>"}, "<s>", "</s>")
    assert t.name == "model"
    out = t.render([{"role": "system", "content": "x"}, {"role": "user", "content": "café \"q\""}])
    assert out == "[user]\"café \\\"q\\\"\"\n4<s>|</s>"


def test_model_template_equals_transformers_rendering():
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=bpe_oracle(), bos_token="<s>", eos_token="</s>")
    msgs = [{"role": "user", "content": "ünïcode \"quoted\" 日本"}]
    theirs = hf.apply_chat_template(msgs, chat_template=HF_FEATURES, tokenize=False)
    ours = template_for_vocab(HF_FEATURES, set(), "<s>", "</s>").render(msgs)
    assert ours == theirs


def test_broken_model_template_falls_back(caplog):
    with caplog.at_level(logging.WARNING):
        t = template_for_vocab("{% for m in messages %}{{ m.content }", {"<|eot_id|>"},
                               "<|begin_of_text|>", "<|eot_id|>")
    assert t.name == "llama3" and "does not work" in caplog.text
    t = template_for_vocab("{{ messages[0]['content'] | no_such_filter }}", set(), "<s>", "</s>")
    assert t.name == "llama2"


def test_template_failing_at_render_time_falls_back(caplog):
    source = "{% if messages | length > 1 %}{{ undefined_fn() }}{% endif %}{{ messages[-1].content }}"
    t = template_for_vocab(source, {"<|im_start|>"}, "", "<|im_end|>")
    assert t.name == "model"
    with caplog.at_level(logging.WARNING):
        out = t.render(CONVERSATION)
    assert out == EXPECTED["chatml"] and "using the built-in chatml" in caplog.text


def test_raise_exception_in_model_template_is_usage_error():
    source = ("{% if messages[0]['role'] == 'system' %}"
              "{{ raise_exception('System role not supported') }}{% endif %}ok")
    t = template_for_vocab(source, set(), "<s>", "</s>")
    assert t.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(UsageError, match="System role not supported"):
        t.render(CONVERSATION)


def test_sandbox_blocks_attribute_escape():
    t = ChatTemplate("{{ ''.__class__.__mro__ }}", "model")
    with pytest.raises(UsageError):
        t.render([])


def test_tokenizer_wires_template_and_tokens():
    md = dict(bpe_metadata("llama-bpe"))
    tok = load_tokenizer(md, len(md["tokenizer.ggml.tokens"]))
    ids = tok.encode_chat(CONVERSATION)
    oracle = bpe_oracle("llama-bpe")
    assert ids == oracle.encode(EXPECTED["llama3"], add_special_tokens=False).ids
    assert ids.count(tok.bos_id) == 1                      # the template wrote BOS itself
    md["tokenizer.chat_template"] = BUILTINS["chatml"][0]
    tok = load_tokenizer(md, len(md["tokenizer.ggml.tokens"]))
    assert tok.chat_template.name == "model"
    assert tok.encode_chat(CONVERSATION)[0] == tok.bos_id  # BOS added: model adds BOS


def test_spm_chat_prompt_tokens_like_llama2():
    sp = spm_processor()
    tok = load_tokenizer(spm_metadata(sp), sp.GetPieceSize())
    assert tok.chat_template.name == "llama2"
    ids = tok.encode_chat(CONVERSATION)
    bos, eos = sp.bos_id(), sp.eos_id()
    first = sp.EncodeAsIds("[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi! [/INST] Hello. ")
    second = sp.EncodeAsIds("[INST] What is 2+2? [/INST]")
    assert ids == [bos] + first + [eos, bos] + second
