"""scripts/prefill_recall_probe.py crosses one prefill's selection with another prefill's K/V: with its own K/V a
prefill's state scores exactly as teacher_force does, and with the other's its slots hold different K/V."""
import jax
import jax.numpy as jnp
import numpy as np

import adore_jax
from adore_jax.policies import Adore, Recall

from references import distance_controller, load_script


def test_own_values_score_as_teacher_force_and_the_other_prefills_change_the_slots(tiny_model):
    probe = load_script("prefill_recall_probe")
    docs = np.random.default_rng(7).integers(3, tiny_model.config.vocab_size, size=(2, 28)).astype(np.int32)
    prompt = 20
    controller = distance_controller(tiny_model.config.hidden_size, -np.arange(64, dtype=np.float32))  # recency
    decode_only = Adore(cache_size=6, returns=Recall(r=2, from_layer=0), sinks=0, attention_weight=0.0,
                        prefill_chunk=4)
    plain = probe.prefilled(tiny_model, docs, prompt, decode_only, controller)
    recalling = probe.prefilled(tiny_model, docs, prompt, decode_only.with_returns(in_prefill=True), controller)
    stores = {name: (s.ps.returns.keys, s.ps.returns.values)
              for name, s in (("plain", plain), ("recalling", recalling))}
    valid = np.asarray(plain.cache.slot_valid)
    own, _ = probe.with_values(plain.cache, plain.ps, stores["plain"], stores["plain"])
    crossed, _ = probe.with_values(plain.cache, plain.ps, stores["recalling"], stores["plain"])
    _, recalls_other = probe.with_values(plain.cache, plain.ps, stores["plain"], stores["recalling"])
    assert (recalls_other.returns.keys, recalls_other.returns.values) == stores["recalling"]
    for layer in range(tiny_model.config.num_layers):
        np.testing.assert_array_equal(np.asarray(own.k[layer])[valid], np.asarray(plain.cache.k[layer])[valid])
        np.testing.assert_array_equal(np.asarray(own.v[layer])[valid], np.asarray(plain.cache.v[layer])[valid])
    deepest = np.abs(np.asarray(crossed.k[-1])[valid] - np.asarray(plain.cache.k[-1])[valid]).max()
    assert deepest > 1e-3, "the recalling prefill computed the same K/V: the crossing is untested"
    plain.cache, plain.ps = jax.tree.map(jnp.copy, probe.with_values(plain.cache, plain.ps, stores["plain"],
                                                                     stores["plain"]))
    expected = adore_jax.teacher_force(tiny_model, docs, prompt, cache=decode_only, controller=controller)
    scored = probe.continuation_logprobs(plain, docs, prompt, plain.run_last_prompt_token())
    np.testing.assert_allclose(scored, expected, atol=1e-5)
