"""generate() as users of transformers / vLLM expect it: chat messages, stop strings and stop token ids,
several samples per prompt, per-token log-probabilities, one compile per max_new_tokens bucket, early
stop, an oversized cache lowered with a warning, and a stream printer that never splits a character."""
import io
import types

import numpy as np
import pytest

import adore_jax
from adore_jax import timing
from adore_jax.session import CacheSizeWarning
from conftest import save_tiny_hf

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def save_tiny_chat_model(directory):
    """A tiny random Llama with a byte-level tokenizer (one token per byte, so characters of several bytes
    span tokens) and a chat template; eos is token 2."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True) for token in specials])
    save_tiny_hf(directory, {"vocab_size": len(vocab)}, seed=3)
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            chat_template=CHAT_TEMPLATE).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return adore_jax.load_model(save_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat")))


# ------------------------------------------------------------------ chat messages

def test_chat_messages_are_formatted_by_the_template(chat_model):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🐉"}]
    want = chat_model.tokenizer.encode(
        chat_model.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False)
    assert chat_model.decode(want) == "<|system|>Be brief.\n<|user|>Hi 🐉\n<|assistant|>"
    out = adore_jax.generate(chat_model, [conversation, "plain"], 4, chat=True)
    assert out.prompt_token_ids[0] == want
    assert out.prompt_token_ids[1] == chat_model.encode([{"role": "user", "content": "plain"}])
    alone = adore_jax.generate(chat_model, conversation, 4)  # one conversation, not in a list
    assert alone.prompt_token_ids == [want] and alone.token_ids[0] == out.token_ids[0]


def test_a_conversation_ending_with_the_assistant_is_continued(chat_model):
    ids = chat_model.encode([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I"}])
    assert chat_model.decode(ids) == "<|user|>Hi\n<|assistant|>Hello, I"


@pytest.mark.parametrize("conversation, message", [
    ([{"role": "robot", "content": "x"}], r"prompts\[0\]\[0\]: role must be one of system, user, assistant"),
    ([{"role": "user", "text": "x"}], r"prompts\[0\]\[0\] must be a message"),
    ([{"role": "user", "content": "x"}, "y"], r"prompts\[0\]\[1\] must be a message"),
])
def test_bad_messages_are_refused_by_position(chat_model, conversation, message):
    with pytest.raises(ValueError, match=message):
        adore_jax.generate(chat_model, [conversation], 4)


# ------------------------------------------------------------------ stops

def test_stop_token_ids_end_a_sequence_like_eos(tiny_model):
    prompts = [[7, 8, 9], [10, 11]]
    free = adore_jax.generate(tiny_model, prompts, 12)
    stop = free.token_ids[0][4]
    out = adore_jax.generate(tiny_model, prompts, 12, stop_token_ids=[stop])
    assert out.token_ids[0] == free.token_ids[0][:free.token_ids[0].index(stop)]
    assert out.finish_reasons[0] == "stop" and out.stop_reasons[0] == stop
    if stop not in free.token_ids[1]:
        assert out.token_ids[1] == free.token_ids[1] and out.finish_reasons[1] == free.finish_reasons[1]


def test_stop_strings_cut_the_text_before_them(chat_model):
    free = adore_jax.generate(chat_model, ["Hello there"], 40)
    text = free.texts[0]
    starts = [k for k in range(3, len(text) - 2) if "\ufffd" not in text[k:k + 2] and text.find(text[k:k + 2]) == k]
    assert starts, f"no usable stop string in {text!r}"
    stop = text[starts[0]:starts[0] + 2]
    out = adore_jax.generate(chat_model, ["Hello there"], 40, stop=["never appears", stop])
    assert out.texts[0] == text[:starts[0]]
    assert out.finish_reasons == ["stop"] and out.stop_reasons == [stop]
    ids = out.token_ids[0]  # up to the token that completed the stop string
    assert ids == free.token_ids[0][:len(ids)]
    assert stop in chat_model.decode(ids) and stop not in chat_model.decode(ids[:-1])
    assert out.stats["decode_steps"] < free.stats["decode_steps"], "decoding went on after the stop string"


def test_stop_strings_need_a_tokenizer(tiny_model):
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        adore_jax.generate(tiny_model, [[1, 2, 3]], 4, stop=["x"])


@pytest.mark.parametrize("options, message", [
    (dict(n=0), "n .samples per prompt. must be an integer >= 1"),
    (dict(stop=[""]), "stop strings must not be empty"),
    (dict(stop=[3]), "stop must be a list of str"),
    (dict(stop_token_ids=[-1]), "stop_token_ids must be >= 0"),
    (dict(stop_token_ids=["a"]), "stop_token_ids must be a list of int"),
])
def test_bad_sampling_values_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        adore_jax.SamplingParams(**options)


# ------------------------------------------------------------------ samples and log-probabilities

def test_n_samples_per_prompt_are_listed_prompt_by_prompt(tiny_model):
    prompts = [[7, 8, 9], [10, 11]]
    out = adore_jax.generate(tiny_model, prompts, 10, temperature=1.0, n=3, seed=1)
    assert len(out.token_ids) == 6 and out.prompt_index == [0, 0, 0, 1, 1, 1]
    assert out.prompt_token_ids == [prompts[0]] * 3 + [prompts[1]] * 3
    assert len({tuple(ids) for ids in out.token_ids[:3]}) > 1, "the samples of one prompt are all the same"
    assert out.samples(1) == out.texts[3:]
    greedy = adore_jax.generate(tiny_model, prompts, 10, n=2)
    single = adore_jax.generate(tiny_model, prompts, 10)
    assert greedy.token_ids == [single.token_ids[0]] * 2 + [single.token_ids[1]] * 2


def test_logprobs_are_the_models_log_probabilities_of_the_generated_tokens(tiny_model):
    prompt = [5, 17, 33, 40]
    out = adore_jax.generate(tiny_model, [prompt], 12, temperature=1.0, seed=2, logprobs=True)
    ids = out.token_ids[0]
    assert len(out.logprobs[0]) == len(ids) >= 2
    want = adore_jax.teacher_force(tiny_model, np.array([prompt + ids]), len(prompt))[0]
    np.testing.assert_allclose(out.logprobs[0], want, atol=1e-4)
    assert adore_jax.generate(tiny_model, [prompt], 12).logprobs is None


# ------------------------------------------------------------------ compiles and early stop

def test_max_new_tokens_in_one_bucket_share_the_compiled_programs(tiny_model):
    adore_jax.generate(tiny_model, [[3] * 20], max_new_tokens=20)
    with timing.track_compiles() as stats:
        out = adore_jax.generate(tiny_model, [[5] * 25], max_new_tokens=30)
    assert stats.count == 0, f"{stats.count} compilations for max_new_tokens 30 after 20"
    assert len(out.token_ids[0]) == 30 or out.finish_reasons[0] == "eos"
    import dataclasses

    unseen = dataclasses.replace(tiny_model, config=dataclasses.replace(tiny_model.config, rms_norm_eps=1.2345e-5))
    with timing.track_compiles() as stats:
        adore_jax.generate(tiny_model, [[6] * 25], max_new_tokens=25)  # compiled already: the counter must stay on
        adore_jax.generate(unseen, [[5] * 25], max_new_tokens=30)  # a model config no program was compiled for
    assert stats.count > 0, "the compile counter saw nothing: it cannot detect recompiles"


def test_decoding_stops_once_every_sequence_has_ended(tiny_model):
    import dataclasses

    free = adore_jax.generate(tiny_model, [[7, 8, 9]], max_new_tokens=40)
    eos = free.token_ids[0][2]
    stopping = dataclasses.replace(tiny_model, config=dataclasses.replace(tiny_model.config, eos_token_ids=(eos,)))
    out = adore_jax.generate(stopping, [[7, 8, 9]], max_new_tokens=40)
    assert out.finish_reasons == ["eos"]
    assert out.stats["decode_steps"] < 39, "decoding ran to max_new_tokens after the sequence ended"


# ------------------------------------------------------------------ oversized caches

def test_a_cache_larger_than_the_run_can_fill_is_lowered_with_a_warning(tiny_model):
    with pytest.warns(CacheSizeWarning, match=r"cache_size 100000 .* using cache_size 128"):
        out = adore_jax.generate(tiny_model, [[1, 2, 3]], 8, cache=adore_jax.Window(cache_size=100000))
    assert out.stats["cache_slots"] <= 129 and out.stats["cache_size"] == 128
    assert out.token_ids == adore_jax.generate(tiny_model, [[1, 2, 3]], 8).token_ids  # nothing is ever released


# ------------------------------------------------------------------ the stream printer

class _ByteModel:
    """Tokens are bytes; decoding replaces an incomplete character with U+FFFD, as a byte-level tokenizer does."""
    config = types.SimpleNamespace(eos_token_ids=(256,))

    @staticmethod
    def decode(ids):
        return bytes(ids).decode("utf-8", errors="replace")


def _stream(text, chunk, stop=()):
    from adore_jax.cli import StreamPrinter

    ids = list(text.encode("utf-8")) + [256]
    out = io.StringIO()
    printer = StreamPrinter(_ByteModel, stop=stop, out=out)
    writes = []
    for start in range(0, len(ids), chunk):
        before = out.getvalue()
        printer(np.array([ids[start:start + chunk]]))
        writes.append(out.getvalue()[len(before):])
    return out.getvalue(), writes


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_the_stream_printer_never_prints_half_a_character(chunk):
    text = "A🐉🔥 你好世界 ok"
    printed, writes = _stream(text, chunk)
    assert printed == text
    assert not any("\ufffd" in w for w in writes)


def test_the_stream_printer_holds_back_a_possible_stop_string():
    printed, _ = _stream("hello XYZ and more", 1, stop=("XYZ",))
    assert printed == "hello "
