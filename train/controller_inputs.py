"""What the controller reads in training: the LLM's input embeddings, or each token's hidden state.

A controller with `input_layer` = l reads every token's hidden state after the LLM's first l layers
(through the final norm, as decoding taps it, `adore_jax.model.run_layers`). Those states do not change
in training (the LLM is frozen), so they are computed once per label row before training starts (and
again when a run resumes) into one host table; each record's tokens are replaced by the rows of that
table that hold its states, and the training step looks them up as it looks up input embeddings. The
table holds every token of every row: 4 bytes x E per token (SmolLM2: 2.3 KB; 400k tokens: 0.9 GB).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from adore_jax.model import run_layers
from adore_jax.train.forward import full_attention

ROW_BUCKET = 256  # rows are padded to a multiple of this before the forward pass: few compiled shapes


@functools.partial(jax.jit, static_argnames=("config", "layer"))
def hidden_states(params, config, tokens, layer: int):
    """tokens [B, T] int32 -> the hidden state after `layer` layers, through the final norm: [B, T, E] float32."""
    first = dict(params, layers=params["layers"][:layer])  # later layers cannot change it: run only these
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    hidden, _, _ = run_layers(first, config, tokens, positions, lambda _, q, k, v: full_attention(q, k, v))
    return hidden.astype(jnp.float32)


class TableRows:
    """A label source whose records' tokens are rows of a table of inputs (a grain data source)."""

    def __init__(self, source, starts):
        self.source, self.starts = source, starts

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        record = dict(self.source[index])
        record["tokens"] = self.starts[index] + np.arange(len(record["tokens"]), dtype=np.int32)
        return record


def controller_inputs(model, controller, sources, progress=None):
    """What `controller` (a ControllerConfig) reads for the records of `sources`: (the model's input embeddings
    [V, E], the sources) or, with an input_layer the model has, (`hidden_state_inputs`' table, the sources
    re-indexed into it). progress(n): called as rows are computed."""
    if controller.input_layer is None:
        return model.params["embed"], tuple(sources)
    controller.check_layers(model.config.num_layers)
    return hidden_state_inputs(model.params, model.config, controller.input_layer, sources, progress)


def hidden_state_inputs(params, config, layer: int, sources, progress=None):
    """The hidden-state table of every token in `sources` and the sources re-indexed into it.

    Returns (table [1 + tokens, E] float32 (row 0: padding, never read as a real token), [TableRows, ...]).
    Causal attention: padding after a row's tokens leaves their states unchanged."""
    chunks, start, remapped = [np.zeros((1, config.hidden_size), np.float32)], 1, []
    for source in sources:
        starts = []
        for index in range(len(source)):
            tokens = np.asarray(source[index]["tokens"], np.int32)
            padded = np.zeros((1, -(-len(tokens) // ROW_BUCKET) * ROW_BUCKET), np.int32)
            padded[0, :len(tokens)] = tokens
            chunks.append(np.asarray(hidden_states(params, config, jnp.asarray(padded), layer))[0, :len(tokens)])
            starts.append(start)
            start += len(tokens)
            if progress is not None:
                progress(1)
        remapped.append(TableRows(source, starts))
    return np.concatenate(chunks), remapped
