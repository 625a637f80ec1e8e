"""generate() as users of transformers / vLLM expect it: chat messages, stop strings and stop token ids
(a sequence that ends inside a decode chunk, against a plain greedy loop over the full-attention forward),
several samples per prompt, per-token log-probabilities, one compile per max_new_tokens bucket, early
stop, an oversized cache lowered with a warning, and a stream printer that never splits a character."""
import dataclasses
import functools
import io
import types

import jax
import numpy as np
import pytest
from conftest import save_tiny_hf

import adore_jax
from adore_jax import timing
from adore_jax.model import forward
from adore_jax.session import DECODE_CHUNK, CacheSizeWarning

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


# ------------------------------------------------------------------ stops, inside a decode chunk

@functools.partial(jax.jit, static_argnums=1)
def full_attention_log_probs(params, config, tokens):
    """The plain causal forward (no cache, no policy): tokens [B, T] -> log p of the next token [B, T, V]."""
    return jax.nn.log_softmax(forward(params, config, tokens), axis=-1)


def greedy_reference(model, prompt, steps):
    """The greedy continuation of `prompt` (token ids) and each token's log-probability, by a plain loop over
    the model's full-attention forward: no cache, no policy, no decode chunks, no host-side stop handling."""
    length = len(prompt) + steps
    tokens = np.zeros((1, length), np.int32)  # [1, T]; causal: what follows position t never changes its logits
    tokens[0, :len(prompt)] = prompt
    logprobs = []
    for t in range(len(prompt), length):
        row = np.asarray(full_attention_log_probs(model.params, model.config, tokens))[0, t - 1]  # [V] for token t
        tokens[0, t] = int(np.argmax(row))
        logprobs.append(float(row[tokens[0, t]]))
    return tokens[0, len(prompt):].tolist(), logprobs


def mid_chunk(k: int) -> bool:
    """Generated token k (0: from the prefill) comes from a decode chunk that goes on after it."""
    return k >= 1 and k % DECODE_CHUNK != 0


def first_index(tokens, ends) -> int:
    return next((k for k, token in enumerate(tokens) if token in ends), len(tokens))


@pytest.mark.parametrize("end", ["stop_token_id", "eos"])
def test_a_sequence_ending_mid_chunk_reports_nothing_after_its_end(tiny_model, end):
    """Row 0 ends at a token in the middle of a decode chunk; row 1 of the same batch decodes on."""
    prompts, steps = [[7, 8, 9], [10, 11]], 3 * DECODE_CHUNK
    (ids, logprobs), (other_ids, other_logprobs) = [greedy_reference(tiny_model, p, steps) for p in prompts]
    eos = set(tiny_model.config.eos_token_ids)
    k = next((k for k in range(steps) if mid_chunk(k) and ids[k] not in ids[:k] and eos.isdisjoint(ids[:k + 1])),
             None)
    assert k is not None, f"no token of {ids} ends the sequence mid-chunk: the test proves nothing"
    model, ends, options, reason = tiny_model, eos | {ids[k]}, dict(stop_token_ids=[ids[k]]), ("stop", ids[k])
    if end == "eos":
        model = dataclasses.replace(model, config=dataclasses.replace(model.config, eos_token_ids=(ids[k],)))
        ends, options, reason = {ids[k]}, {}, ("eos", None)
    out = adore_jax.generate(model, prompts, steps, logprobs=True, decode_chunk=DECODE_CHUNK, **options)
    assert out.token_ids[0] == ids[:k]
    np.testing.assert_allclose(out.logprobs[0], logprobs[:k], atol=1e-4)
    assert (out.finish_reasons[0], out.stop_reasons[0]) == reason
    cut = first_index(other_ids, ends)
    assert out.token_ids[1] == other_ids[:cut]
    np.testing.assert_allclose(out.logprobs[1], other_logprobs[:cut], atol=1e-4)
    assert out.finish_reasons[1] == ("length" if cut == steps else reason[0])


def test_a_stop_string_completed_mid_chunk_cuts_text_tokens_and_logprobs_there(chat_model):
    """Byte-level tokens: the stop string's last character is the token that completes it."""
    steps = 5 * DECODE_CHUNK
    ids, logprobs = greedy_reference(chat_model, chat_model.encode("Hello there"), steps)
    ids = ids[:first_index(ids, chat_model.config.eos_token_ids)]
    texts = [chat_model.decode(ids[:k + 1]) for k in range(len(ids))]  # the text after each token

    def completed_at(k):
        """The last two characters of the text, if token k completes them (a stop string found first there)."""
        tail = texts[k][-2:]
        return tail if len(tail) == 2 and "\ufffd" not in tail and tail not in texts[k - 1] else None

    k = next((k for k in range(DECODE_CHUNK + 1, len(ids)) if mid_chunk(k) and completed_at(k)), None)
    assert k is not None, f"no stop string is completed mid-chunk after the first chunk in {texts[-1]!r}"
    stop = completed_at(k)
    out = adore_jax.generate(chat_model, ["Hello there"], steps, stop=["never appears", stop], logprobs=True,
                             decode_chunk=DECODE_CHUNK)
    assert out.texts == [texts[k][:-2]]
    assert out.token_ids == [ids[:k + 1]]
    np.testing.assert_allclose(out.logprobs[0], logprobs[:k + 1], atol=1e-4)
    assert out.finish_reasons == ["stop"] and out.stop_reasons == [stop]
    assert out.stats["decode_steps"] < steps - 1, "decoding went on after the stop string"


def test_stop_token_ids_outside_the_vocabulary_are_refused(tiny_model):
    with pytest.raises(ValueError, match=r"stop_token_ids must be in \[0, 97\) \(the model's vocabulary\); got 97"):
        adore_jax.generate(tiny_model, [[1, 2, 3]], 4, stop_token_ids=[5, 97])


def test_stop_strings_need_a_tokenizer(tiny_model):
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        adore_jax.generate(tiny_model, [[1, 2, 3]], 4, stop=["x"])


@pytest.mark.parametrize("options, message", [
    (dict(n=0), "n .samples per prompt. must be an integer >= 1"),
    (dict(temperature=float("inf")), r"temperature must be a finite number >= 0 \(0 = greedy\); got inf"),
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


def test_a_requests_samples_depend_on_the_seed_and_the_request_not_its_place_in_the_batch(tiny_model):
    """Each row's PRNG key comes from the seed, its prompt and its sample index: the same request gives the same
    sample alone or beside others, different prompts do not share a stream, and the seed matters."""
    prompts = [[7, 8, 9], [10, 11], [12, 13, 14, 15]]
    batch = adore_jax.generate(tiny_model, prompts, 12, temperature=1.0, seed=3)
    for i, prompt in enumerate(prompts):
        assert adore_jax.generate(tiny_model, [prompt], 12, temperature=1.0, seed=3).token_ids[0] == batch.token_ids[i]
    reordered = adore_jax.generate(tiny_model, prompts[::-1], 12, temperature=1.0, seed=3)
    assert reordered.token_ids[::-1] == batch.token_ids
    other_seed = adore_jax.generate(tiny_model, prompts, 12, temperature=1.0, seed=4)
    assert other_seed.token_ids != batch.token_ids


def test_sampling_may_be_a_mapping_of_its_fields(tiny_model):
    a = adore_jax.generate(tiny_model, [[7, 8, 9]], 6, sampling={"temperature": 1.0, "top_k": 5}, seed=1)
    b = adore_jax.generate(tiny_model, [[7, 8, 9]], 6, sampling=adore_jax.SamplingParams(temperature=1.0, top_k=5),
                           seed=1)
    assert a.token_ids == b.token_ids
    with pytest.raises(TypeError, match="sampling has no option 'temp'"):
        adore_jax.generate(tiny_model, [[7, 8, 9]], 6, sampling={"temp": 1.0})
    with pytest.raises(TypeError, match="sampling must be a SamplingParams or a mapping"):
        adore_jax.generate(tiny_model, [[7, 8, 9]], 6, sampling=0.5)


def test_logprobs_are_the_models_log_probabilities_of_the_sampled_tokens(tiny_model):
    prompt = [5, 17, 33, 40]
    out = adore_jax.generate(tiny_model, [prompt], 12, temperature=1.0, seed=2, logprobs=True)
    ids = out.token_ids[0]
    assert len(out.logprobs[0]) == len(ids) >= 2
    log_probs = full_attention_log_probs(tiny_model.params, tiny_model.config, np.array([prompt + ids]))[0]
    want = log_probs[np.arange(len(prompt) - 1, len(prompt) + len(ids) - 1), ids]  # log p(token t | tokens < t)
    np.testing.assert_allclose(out.logprobs[0], want, atol=1e-4)
    assert adore_jax.generate(tiny_model, [prompt], 12).logprobs is None


# ------------------------------------------------------------------ compiles and early stop

def test_max_new_tokens_in_one_bucket_share_the_compiled_programs(tiny_model):
    adore_jax.generate(tiny_model, [[3] * 20], max_new_tokens=20)
    with timing.track_compiles() as stats:
        out = adore_jax.generate(tiny_model, [[5] * 25], max_new_tokens=30)
    assert stats.count == 0, f"{stats.count} compilations for max_new_tokens 30 after 20"
    assert len(out.token_ids[0]) == 30 or out.finish_reasons[0] == "eos"
    unseen = dataclasses.replace(tiny_model, config=dataclasses.replace(tiny_model.config, rms_norm_eps=1.2345e-5))
    with timing.track_compiles() as stats:
        adore_jax.generate(tiny_model, [[6] * 25], max_new_tokens=25)  # compiled already: the counter must stay on
        adore_jax.generate(unseen, [[5] * 25], max_new_tokens=30)  # a model config no program was compiled for
    assert stats.count > 0, "the compile counter saw nothing: it cannot detect recompiles"


def test_decoding_stops_once_every_sequence_has_ended(tiny_model):
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
