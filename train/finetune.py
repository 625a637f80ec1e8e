"""Sparse fine-tuning (docs/design.md): next-token loss under top-K attention, LoRA or full weights.

    summary = finetune(load_config(FinetuneConfig, "configs/finetune_smollm2.yaml"))

Rows are single documents truncated to seq_len (not packed): the top-K kernel is causal without
segment ids, and a row's padding sits after its document, where no real query can see it. At the
end a LoRA run saves its adapter (a few MB; `adore_jax.load_model(base, adapter=adapter_dir)`
merges it on load) and, with `export_merged`, the merged model as a Hugging Face directory
(config.json + model.safetensors + tokenizer) that `adore_jax.load_model(export_dir)` loads.
"""
import json
import os

import jax
import numpy as np
import optax

from adore_jax.adapters import save_adapter
from adore_jax.train import lora as lora_lib
from adore_jax.train import sharding
from adore_jax.train.config import FinetuneConfig
from adore_jax.train.forward import forward_logits, make_attention, next_token_loss
from adore_jax.train.loop import Checkpoints, MetricsLog, make_optimizer, plot_metrics, record_config, run_steps


def model_params(trainable, frozen, lora_scale):
    """The params the forward sees: base + adapters (LoRA) or the trainable params themselves."""
    return trainable if lora_scale is None else lora_lib.apply_lora(frozen, trainable, lora_scale)


def loss_fn(trainable, frozen, model_config, batch, attention, lora_scale, remat=False):
    params = model_params(trainable, frozen, lora_scale)
    logits = forward_logits(params, model_config, batch["tokens"], batch["positions"], attention, remat=remat)
    loss, count = next_token_loss(logits, batch["tokens"], batch["segment_ids"])
    return loss, {"loss": loss, "tokens": count}


def make_train_step(model_config, optimizer, attention, lora_scale, remat=False):
    """(state {params, opt_state}, frozen, batch) -> (state, metrics); lora_scale None = full FT;
    remat: recompute each layer's activations in the backward pass (jax.checkpoint)."""
    def train_step(state, frozen, batch):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, metrics), grads = grad_fn(state["params"], frozen, model_config, batch, attention, lora_scale, remat)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        metrics["grad_norm"] = optax.tree.norm(grads)
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, metrics
    return train_step


def decay_mask(params):
    """AdamW weight decay on matrices only (not norms or biases)."""
    return jax.tree.map(lambda x: x.ndim > 1, params)


def setup_training(config: FinetuneConfig, base_params, total_steps):
    """(trainable params, frozen params or None, lora scale or None, optimizer, schedule)."""
    if config.lora.enabled:
        lora_lib.check_targets(config.lora.targets)
        trainable = lora_lib.init_lora(base_params, config.lora.rank, config.lora.targets,
                                       jax.random.key(config.seed))
        frozen, scale = base_params, config.lora.alpha / config.lora.rank
    else:
        trainable, frozen, scale = base_params, None, None
    optimizer, schedule = make_optimizer(config.optim, total_steps, mask=decay_mask)
    return trainable, frozen, scale, optimizer, schedule


def row_batches(config: FinetuneConfig, tokenizer, split, num_epochs, shuffle):
    """Batches of unpacked rows of config.data (one document each, cut to seq_len) from `split`."""
    from adore_jax.data import BatchConfig, batch_iterator, load_split

    records = load_split(config.data.dataset, split, config.data.data_dir)
    return batch_iterator(records, tokenizer, BatchConfig(
        seq_len=config.data.seq_len, batch_size=config.batch_size, pack=False, shuffle=shuffle,
        seed=config.data.seed, num_epochs=num_epochs, drop_remainder=True, min_tokens=config.data.min_tokens,
        exclude_ids=config.data.exclude_ids))


def finetune(config: FinetuneConfig, stop_after=None, model=None) -> dict:
    """Run (or resume) a sparse fine-tune; returns the final metrics. See train_controller for stop_after."""
    run_dir = os.path.abspath(config.run_dir)
    os.makedirs(run_dir, exist_ok=True)
    if config.attention == "topk" and not 1 <= config.top_k <= config.data.seq_len:
        raise ValueError(f"top_k={config.top_k} must be between 1 and the sequence length {config.data.seq_len}")
    sharding.initialize_distributed(config.mesh)
    mesh = sharding.make_mesh(config.mesh)
    if model is None:
        from adore_jax import load_model
        model = load_model(config.model, config.dtype)
    attention = make_attention(config.attention, config.top_k, impl=config.kernel_impl)
    trainable, frozen, scale, optimizer, schedule = setup_training(config, model.params, config.steps)
    state = {"params": trainable, "opt_state": optimizer.init(trainable)}
    state_shardings = sharding.tree_shardings(state, mesh, sharding.LLM_RULES)
    state = jax.device_put(state, state_shardings)
    if frozen is not None:
        frozen = sharding.shard_tree(frozen, mesh, sharding.LLM_RULES)

    iterator = row_batches(config, model.tokenizer, "train", None, True)
    checkpoints = Checkpoints(os.path.join(run_dir, "checkpoints"), config.max_to_keep, config.checkpoint_every)
    start = checkpoints.latest_step() or 0
    if start:
        state, data_state, _ = checkpoints.restore(start, state)
        iterator.set_state(data_state)
    record_config(config, run_dir, resumed=bool(start))

    step_fn = jax.jit(make_train_step(model.config, optimizer, attention, scale, config.remat),
                      out_shardings=(state_shardings, None), donate_argnums=0)
    # Held-out loss under the training attention and, for top-K, under full attention too: their gap is the
    # top-K damage the fine-tune repairs; the full-attention loss alone shows what it costs full attention.
    attentions = {"eval_loss": attention}
    if config.attention != "full":
        attentions["eval_loss_full"] = make_attention("full")
    eval_losses = {name: jax.jit(lambda p, f, b, a=a: loss_fn(p, f, model.config, b, a, scale)[1])
                   for name, a in attentions.items()}
    log = MetricsLog(os.path.join(run_dir, "metrics.jsonl"), config.steps, start, desc="finetune")

    def run_eval(step, state):
        totals = dict.fromkeys(eval_losses, 0.0)
        count = 0.0
        batches = row_batches(config, model.tokenizer, "validation", 1, False)
        for _, batch in zip(range(config.eval_batches), batches):
            batch = sharding.shard_batch(batch, mesh)
            for name, eval_loss in eval_losses.items():
                metrics = jax.device_get(eval_loss(state["params"], frozen, batch))
                totals[name] += float(metrics["loss"]) * float(metrics["tokens"])
            count += float(metrics["tokens"])
        means = {name: total / max(count, 1.0) for name, total in totals.items()}
        return log.log(step, **means, eval_perplexity=float(np.exp(means["eval_loss"])))

    def train_step(state, batch, _):
        return step_fn(state, frozen, sharding.shard_batch(batch, mesh))

    if start == 0 and config.eval_every:  # the base model's held-out loss under this attention: the curve's origin
        run_eval(0, state)

    state, final = run_steps(state, iterator, train_step, first_step=start, total_steps=config.steps, log=log,
                             checkpoints=checkpoints, schedule=schedule, evaluate=run_eval,
                             log_every=config.log_every, eval_every=config.eval_every,
                             meta=lambda step: {"step": step}, stop_after=stop_after)
    if "stopped_at" in final:
        return final
    trained = sharding.host_tree(state["params"])  # every process joins the gather, process 0 writes
    frozen = sharding.host_tree(frozen) if scale is not None and config.export_merged else None
    return {**final, **export(config, run_dir, trained, frozen, scale, model, final)}


def export(config: FinetuneConfig, run_dir: str, trained, frozen, scale, model, final: dict) -> dict:
    """Write what the run produced: the adapter (LoRA), the merged model when asked (or for a full
    fine-tune), the loss plot and summary.json. Returns the paths written."""
    paths = {}
    if jax.process_index() != 0:
        return paths
    if scale is not None:
        paths["adapter_dir"] = save_adapter(config.adapter_dir or os.path.join(run_dir, "adapter"), trained,
                                            base=config.model, alpha=config.lora.alpha)
    if scale is None or config.export_merged:
        merged = trained if scale is None else lora_lib.merge_lora(frozen, trained, scale)
        paths["export_dir"] = lora_lib.export_hf(config.export_dir or os.path.join(run_dir, "model"), merged,
                                                 model.config, model.tokenizer)
    plot_metrics(os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "loss.png"),
                 ["loss", "eval_loss", "eval_loss_full", "grad_norm"])
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump({**final, **paths}, f, indent=2)
    return paths
