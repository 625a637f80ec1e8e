"""The real embedded model: our GGUF path against transformers loading the same GGUF file."""
import os

import numpy as np
import pytest

import adore_jax
from adore_jax import weights
from adore_jax.model import forward

pytestmark = pytest.mark.slow
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


@pytest.fixture(scope="module")
def reference():
    """transformers' LlamaForCausalLM on the same GGUF (dequantised by transformers, run by torch)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    path = weights.embedded_model_path("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    return model.eval()


def test_logits_match_transformers(smollm2, reference):
    import torch

    ids = smollm2.encode(PROMPT, chat=True)
    assert ids[:3] == [1, 9690, 198]  # <|im_start|>system\n
    ours = np.asarray(forward(smollm2.params, smollm2.config, np.array([ids], np.int32)))[0]
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits[0].numpy()
    diff = np.max(np.abs(ours - theirs))
    assert diff <= 1e-3, f"max |logit difference| {diff:.2e}"


def test_greedy_decoding_matches_transformers(smollm2, reference):
    import torch

    ids = smollm2.encode(PROMPT, chat=True)
    ours = adore_jax.generate(smollm2, [ids], max_new_tokens=32)
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    assert len(ours.token_ids[0]) == 32, ours.texts[0]
    assert ours.token_ids[0] == theirs
    assert "keeper" in ours.texts[0].lower(), ours.texts[0]


def test_tokenizer_round_trips_and_splits_digits(smollm2):
    text = "In 2024, the café served 1,234 crêpes — naïvely. <|im_end|>"
    ids = smollm2.tokenizer.encode(text)
    assert smollm2.tokenizer.decode(ids) == text
    assert ids[-1] == 2  # the control token stays whole
    digits = smollm2.tokenizer.encode("2024")
    assert len(digits) == 4, "SmolLM2's vocabulary was learned with single-digit pre-splitting"


def test_perplexity_of_real_text_is_sane(smollm2):
    """An encyclopedic paragraph: SmolLM2 reaches a perplexity near 9; noise would be ~49k."""
    text = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
            "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
            "from 1887 to 1889. Locally nicknamed \"La dame de fer\" (French for \"Iron Lady\"), it was "
            "constructed as the centrepiece of the 1889 World's Fair, and to crown the centennial "
            "anniversary of the French Revolution.")
    ids = np.array([smollm2.tokenizer.encode(text)], np.int32)
    logits = np.asarray(forward(smollm2.params, smollm2.config, ids))[0, :-1]
    peak = logits.max(-1, keepdims=True)
    logp = logits - np.log(np.sum(np.exp(logits - peak), -1, keepdims=True)) - peak
    nll = -np.mean(logp[np.arange(len(logp)), ids[0, 1:]])
    assert 2.0 < np.exp(nll) < 20.0, np.exp(nll)


def test_cli_streams_and_prints_timing(capsys):
    from adore_jax.cli import main

    assert main(["generate", "--chat", "--stream", "--max-new-tokens", "12",
                 "--prompt", "What is the capital of France?"]) == 0
    printed = capsys.readouterr()
    assert "Paris" in printed.out and "[timing]" not in printed.out  # the text alone on stdout
    assert "[timing]" in printed.err and "tokens/s" in printed.err


def test_cli_reports_bad_input(capsys):
    from adore_jax.cli import main

    assert main(["generate", "--model", "no-such-model", "--prompt", "x"]) == 2
    assert "model source 'no-such-model' not found" in capsys.readouterr().err
