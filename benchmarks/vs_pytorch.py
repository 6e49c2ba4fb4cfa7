"""Side by side with transformers + PyTorch (CPU, eager): the same model, weights and hyperparameters.

    CROSSWRITE_DATA=../shared/data python benchmarks/vs_pytorch.py --model t5 [--quick]
    CROSSWRITE_DATA=../shared/data python benchmarks/vs_pytorch.py --model bert [--quick]

t5:   T5 v1.1-style encoder-decoder, d_model 256, d_ff 1024, 4+4 layers, 4 heads, vocab 8k; batches of 64
      Multi30k en->de pairs, max length 48; label smoothing 0.1.
bert: BERT-style masked LM, d_model 256, d_ff 1024, 4 layers, 4 heads, vocab 8k, sequence 128, batch 32 on the
      raw-text corpus (books + news, as configs/pretrain_mlm.py); 15% of tokens predicted.
Both sides start from identical weights (our init, converted with crosswrite_jax.models.hf), train with AdamW
(lr 1e-3, weight decay 0.01, clipping at 1.0) and the same token-mean cross-entropy; the first step's losses are
printed side by side as a check. PyTorch uses torch.set_num_threads(--threads, default: all cores); on a
machine where other work holds a core, also try --threads 1 (OpenMP threads then wait on each other).

Two comparisons, each in alternating rounds (ours, theirs, ours, ...; the median round counts):
  compute-equivalent: the very same batches at identical padded shapes ([64, 48] pairs; [32, 128] rows) on
      both sides; ratio = our padded tokens/s over theirs.
  end to end: each side's best input handling at steady state: ours length bucketing (and packing; the better
      is reported) with async dispatch, PyTorch padding each random batch to its longest sequence;
      ratio = our real (non-pad) tokens/s over theirs. For bert, ours also runs with the MLM head on the first
      --mlm-max-predictions masked positions of a row (the pretraining recipe's setting; transformers projects
      every position), on the same batches and end to end; it counts as an end-to-end alternative only.
Compile time (ours) is excluded from both and printed. Host-side batch preparation is done before timing on
both sides. Ends with one JSON line holding `ratio` (compute-equivalent) and `end_to_end_ratio`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from crosswrite_jax import config as config_lib
from crosswrite_jax import sharding
from crosswrite_jax.batches import make_dataset
from crosswrite_jax.config import Config, DataConfig, OptimizerConfig, TrainConfig
from crosswrite_jax.data import pretraining, text_sources
from crosswrite_jax.data.sources import read_parallel
from crosswrite_jax.data.tokenizer import Tokenizer
from crosswrite_jax.models import hf, presets
from crosswrite_jax.models.transformer import PAD_ID
from crosswrite_jax.sharding import to_global_batch
from crosswrite_jax.trainer import Trainer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SIZES = dict(vocab_size=8000, d_model=256, num_heads=4, d_ff=1024, dropout_rate=0.0)
# Ours projects and scores 8 positions at a time (train.logits_chunk_length): the same math and FLOPs as one
# projection over all positions, with each chunk's logits and their gradient taken while they are in cache.
LOGITS_CHUNK = 8
OPTIMIZER = OptimizerConfig(learning_rate=1e-3, schedule="constant", warmup_steps=0, weight_decay=0.01,
                            grad_clip_norm=1.0, b1=0.9, b2=0.98, eps=1e-9)


# ----------------------------------------------------------------------------------------------- configs + data


def t5_config(data_dir: str, steps: int) -> Config:
    model = presets.t5("1.1", num_encoder_layers=4, num_decoder_layers=4, max_length=64, **SIZES)
    data = DataConfig(dataset=str(Path(data_dir) / "multi30k"), max_source_length=48, max_target_length=48,
                      bucket_lengths=(48,), packing=False)
    return Config(name="vs_pytorch_t5", task="translation", model=model, data=data, optimizer=OPTIMIZER,
                  train=TrainConfig(steps=steps, batch_size=64, label_smoothing=0.1, eval_every=0,
                                    progress_bar=False, logits_chunk_length=LOGITS_CHUNK))


def bert_config(data_dir: str, steps: int) -> Config:
    recipe = config_lib.load(CONFIGS / "pretrain_mlm.py")
    model = presets.bert(num_encoder_layers=4, max_length=128, head="mlm", pooler=False, **SIZES)
    data = dataclasses.replace(recipe.data, data_dir=data_dir, max_source_length=128)
    return Config(name="vs_pytorch_bert", task="mlm", model=model, data=data, optimizer=OPTIMIZER,
                  train=TrainConfig(steps=steps, batch_size=32, label_smoothing=0.0, eval_every=0, progress_bar=False,
                                    logits_chunk_length=LOGITS_CHUNK))


def t5_batches(config: Config, count: int) -> dict[str, list[dict[str, np.ndarray]]]:
    """Padded-to-48 batches (both sides), bucketed and packed (ours), and random pairs cut to their longest."""
    d = config.data
    pairs = read_parallel(d.dataset, "train", d.source_lang, d.target_lang)
    started = time.perf_counter()
    tokenizer = Tokenizer.train([s for p in pairs for s in p], config.model.vocab_size)
    print(f"trained an 8k BPE tokenizer on {len(pairs)} pairs in {time.perf_counter() - started:.1f}s", flush=True)
    padded = make_dataset(pairs, tokenizer, config, seed=0)
    bucketed_config = config_lib.override(config, {"data.bucket_lengths": (16, 24, 32, 40, 48)})
    bucketed = make_dataset(pairs, tokenizer, bucketed_config, seed=0)
    packed_config = config_lib.override(config, {"data.packing": True, "train.batch_size": 32})
    packed = make_dataset(pairs, tokenizer, packed_config, seed=0)
    random = make_dataset(pairs, tokenizer, config_lib.override(config, {"data.length_grouping_window": 1}), seed=1)
    return {"padded": [padded[i] for i in range(count)], "bucketed": [bucketed[i] for i in range(count)],
            "packed": [packed[i] for i in range(count)],
            "torch_longest": [_cut_to_longest(random[i]) for i in range(count)]}


def bert_batches(config: Config, count: int) -> dict[str, list[dict[str, np.ndarray]]]:
    """Packed rows of 128 (both sides; ours end to end) and one example a row cut to the longest (PyTorch)."""
    d = config.data
    sources = [text_sources.read_documents(spec, d.data_dir) for spec in d.sources]
    started = time.perf_counter()
    sample = [doc for docs in sources for doc in docs[:5000]]
    tokenizer = Tokenizer.train(sample, config.model.vocab_size, "wordpiece", mask=True)
    print(f"trained an 8k WordPiece tokenizer on {len(sample)} documents in {time.perf_counter() - started:.1f}s",
          flush=True)

    def batches(packing: bool):
        ds = pretraining.pretraining_dataset(
            sources, tokenizer, task="mlm", objective=config.objective, vocab_size=config.model.vocab_size,
            global_batch_size=config.train.batch_size, inputs_length=d.max_source_length,
            targets_length=d.max_target_length, seed=0, weights=d.mixture_weights, packing=packing)
        return list(itertools.islice(iter(ds), count))

    packed = batches(True)
    return {"padded": packed, "packed": packed, "torch_longest": [_cut_to_longest(b, mlm=True) for b in batches(False)]}


def _cut_to_longest(batch: dict[str, np.ndarray], mlm: bool = False) -> dict[str, np.ndarray]:
    """Each [B, L] entry cut to the longest sequence of the batch (MLM targets follow their inputs)."""
    out = {}
    for key, value in batch.items():
        tokens = batch["inputs" if mlm or key.startswith("inputs") else "targets"] != PAD_ID
        longest = int(np.max(np.nonzero(tokens.any(0))[0])) + 1 if tokens.any() else 1
        out[key] = value[:, :longest]
    return out


def counts(batch: dict[str, np.ndarray], keys: tuple[str, ...]) -> tuple[int, int]:
    return (sum(int(np.count_nonzero(batch[k] != PAD_ID)) for k in keys), sum(int(batch[k].size) for k in keys))


# ----------------------------------------------------------------------------------------------- ours


class Ours:
    """Our jitted, donated train step on one CPU device."""

    def __init__(self, config: Config):
        self.trainer = Trainer.build(config, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
        self.state = self.trainer.init_state()
        self.step = self.trainer.jit_train_step()
        self.shapes: set = set()
        self.compile_seconds = 0.0

    def params(self):
        return jax.device_get(self.state.params)

    def warm(self, batches) -> None:
        """Compiles every shape (timed) so that runs measure steady state."""
        with self.trainer.context():
            for batch in batches:
                key = tuple(sorted((k, v.shape) for k, v in batch.items()))
                if key in self.shapes:
                    continue
                started = time.perf_counter()
                self.state, metrics = self.step(self.state, to_global_batch(batch, self.trainer.mesh))
                jax.block_until_ready(metrics)
                self.compile_seconds += time.perf_counter() - started
                self.shapes.add(key)

    def first_loss(self, batch) -> float:
        with self.trainer.context():
            self.state, metrics = self.step(self.state, to_global_batch(batch, self.trainer.mesh))
        return float(metrics["loss_sum"] / metrics["tokens"])

    def run(self, batches) -> float:
        """Seconds for the batches, dispatched asynchronously (as the training loop does), one wait at the end."""
        mesh = self.trainer.mesh
        with self.trainer.context():
            device = [to_global_batch(b, mesh) for b in batches]
            started = time.perf_counter()
            for batch in device:
                self.state, metrics = self.step(self.state, batch)
            jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - started


# ----------------------------------------------------------------------------------------------- transformers


class Theirs:
    """The same architecture in transformers (eager PyTorch), our initial weights, AdamW, the same loss."""

    def __init__(self, config: Config, params, threads: int):
        import torch
        from transformers import BertConfig, BertForMaskedLM, T5Config, T5ForConditionalGeneration

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.torch, self.config = torch, config
        m = config.model
        kind = hf.kind_of(m)
        hf_config = hf.config_to_hf(kind, m)
        if kind == "t5":
            model = T5ForConditionalGeneration(T5Config.from_dict(hf_config))
        else:
            model = BertForMaskedLM(BertConfig.from_dict(hf_config))
        tensors = {k: torch.from_numpy(np.array(v)) for k, v in hf.params_to_hf(kind, m, params).items()}
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        tied = {"lm_head.weight", "decoder.embed_tokens.weight", "encoder.embed_tokens.weight",
                "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
        assert not unexpected and set(missing) <= tied, (missing, unexpected)
        model.train()
        self.model, self.kind = model, kind
        o = config.optimizer
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps,
                                           weight_decay=o.weight_decay)

    def _loss(self, batch):
        torch = self.torch
        if self.kind == "t5":
            inputs = torch.from_numpy(batch["inputs"].astype(np.int64))
            targets = torch.from_numpy(batch["targets"].astype(np.int64))
            decoder_inputs = torch.nn.functional.pad(targets, (1, 0))[:, :-1]
            logits = self.model(input_ids=inputs, attention_mask=(inputs != PAD_ID).long(),
                                decoder_input_ids=decoder_inputs).logits
        else:
            inputs = torch.from_numpy(batch["inputs"].astype(np.int64))
            targets = torch.from_numpy(batch["targets"].astype(np.int64))
            logits = self.model(input_ids=inputs, attention_mask=(inputs != PAD_ID).long(),
                                token_type_ids=torch.zeros_like(inputs)).logits
        tokens = (targets != PAD_ID).sum().clamp(min=1)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                                 ignore_index=PAD_ID, reduction="sum",
                                                 label_smoothing=self.config.train.label_smoothing)
        return loss / tokens

    def train_step(self, batch) -> float:
        loss = self._loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optimizer.grad_clip_norm)
        self.optimizer.step()
        return float(loss.detach())

    def run(self, batches) -> float:
        started = time.perf_counter()
        for batch in batches:
            self.train_step(batch)
        return time.perf_counter() - started


# ----------------------------------------------------------------------------------------------- comparison


def alternate(name: str, ours: Ours, theirs: Theirs, our_batches, their_batches, keys, rounds: int,
              steps: int, metric: str) -> dict:
    """`rounds` alternating runs of `steps` batches each; throughputs of the median round and their ratio."""
    ours_rates, theirs_rates = [], []
    for r in range(rounds):
        window = slice((r * steps) % max(len(our_batches) - steps + 1, 1), None)
        mine = our_batches[window][:steps]
        other = their_batches[window][:steps]
        seconds = ours.run(mine)
        real, padded = map(sum, zip(*(counts(b, keys) for b in mine)))
        ours_rates.append({"real": real / seconds, "padded": padded / seconds, "step_s": seconds / len(mine)})
        seconds = theirs.run(other)
        real, padded = map(sum, zip(*(counts(b, keys) for b in other)))
        theirs_rates.append({"real": real / seconds, "padded": padded / seconds, "step_s": seconds / len(other)})
        print(f"  {name} round {r + 1}: ours {ours_rates[-1][metric]:,.0f} {metric} tok/s "
              f"({ours_rates[-1]['step_s']:.3f} s/step), pytorch {theirs_rates[-1][metric]:,.0f} "
              f"({theirs_rates[-1]['step_s']:.3f} s/step)", flush=True)

    def median(rates):
        return {k: round(statistics.median(r[k] for r in rates), 3 if k == "step_s" else 0) for k in rates[0]}

    a, b = median(ours_rates), median(theirs_rates)
    return {"ours": a, "pytorch": b, "ratio": round(a[metric] / b[metric], 2), "metric": f"{metric} tokens/s"}


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("t5", "bert"), default="t5")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 steps (a few minutes on 2 cores)")
    parser.add_argument("--steps", type=int, default=8, help="steps per run (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per comparison (default 3)")
    parser.add_argument("--data", default=os.environ.get("CROSSWRITE_DATA", ""),
                        help="folder holding multi30k/ and pretrain_text/ (default: $CROSSWRITE_DATA)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--mlm-max-predictions", type=int, default=40,
                        help="bert: also time ours with the MLM head on this many masked positions a row "
                             "(configs/pretrain_mlm.py's setting; 0: skip)")
    args = parser.parse_args()
    if not args.data:
        parser.error("pass --data ../shared/data or set CROSSWRITE_DATA")
    return args


def main() -> None:
    args = _arguments()
    steps, rounds = (3, 2) if args.quick else (args.steps, args.rounds)
    count = steps * rounds + 2
    config = (t5_config if args.model == "t5" else bert_config)(args.data, steps=1000)
    batches = (t5_batches if args.model == "t5" else bert_batches)(config, count)
    keys = ("inputs", "targets") if args.model == "t5" else ("inputs",)

    ours = Ours(config)
    theirs = Theirs(config, ours.params(), args.threads)
    probe = batches["padded"][0]
    first = {"ours": ours.first_loss(probe), "pytorch": theirs.train_step(probe)}
    print(f"first-step loss on the same batch and weights: ours {first['ours']:.4f}, pytorch {first['pytorch']:.4f}",
          flush=True)
    ends = ["bucketed", "packed"] if args.model == "t5" else ["packed"]
    started = time.perf_counter()
    ours.warm(batches["padded"] + [b for e in ends for b in batches[e]])
    print(f"ours: compiled {len(ours.shapes)} shapes in {ours.compile_seconds:.1f}s "
          f"(startup {time.perf_counter() - started:.1f}s)", flush=True)
    theirs.run(batches["torch_longest"][:1])  # PyTorch's warm-up step

    results = {"compute_equivalent": alternate("compute-equivalent", ours, theirs, batches["padded"],
                                               batches["padded"], keys, rounds, steps, "padded")}
    end_to_end = {e: alternate(f"end-to-end ({e})", ours, theirs, batches[e], batches["torch_longest"], keys,
                               rounds, steps, "real") for e in ends}
    if args.model == "bert" and args.mlm_max_predictions:
        # Ours with the MLM head on the first N masked positions of a row only (PyTorch's BertForMaskedLM projects
        # every position): the same batches and loss, less work. Reported beside, not as, the compute-equivalent.
        capped = Ours(config_lib.override(config, {"model.mlm_max_predictions": args.mlm_max_predictions}))
        capped.warm(batches["packed"][:1])
        results["same_batches_masked_positions_head"] = alternate(
            f"same batches, our head on <= {args.mlm_max_predictions} masked positions a row", capped, theirs,
            batches["padded"], batches["padded"], keys, rounds, steps, "padded")
        end_to_end["packed, masked-positions head"] = alternate(
            "end-to-end (packed, masked-positions head)", capped, theirs, batches["packed"],
            batches["torch_longest"], keys, rounds, steps, "real")
    best = max(end_to_end, key=lambda e: end_to_end[e]["ours"]["real"])
    results["end_to_end"] = dict(end_to_end[best], ours_input=best,
                                 alternatives={e: r["ours"]["real"] for e, r in end_to_end.items()})
    ce, e2e = results["compute_equivalent"], results["end_to_end"]
    print(f"compute-equivalent ({args.model}, identical padded batches): ours {ce['ours']['padded']:,.0f} padded "
          f"tok/s ({ce['ours']['step_s']:.3f} s/step), pytorch {ce['pytorch']['padded']:,.0f} "
          f"({ce['pytorch']['step_s']:.3f} s/step): {ce['ratio']}x")
    if "same_batches_masked_positions_head" in results:
        mp = results["same_batches_masked_positions_head"]
        print(f"same batches, our MLM head on masked positions only: ours {mp['ours']['padded']:,.0f} padded tok/s, "
              f"pytorch (every position) {mp['pytorch']['padded']:,.0f}: {mp['ratio']}x")
    print(f"end to end ({args.model}): ours ({best}) {e2e['ours']['real']:,.0f} real tok/s, pytorch (pad to longest) "
          f"{e2e['pytorch']['real']:,.0f}: {e2e['ratio']}x")
    print(json.dumps({"model": args.model, "quick": args.quick, "steps": steps, "rounds": rounds,
                      "threads": args.threads, "first_step_loss": first, "compile_s": round(ours.compile_seconds, 1),
                      **results, "ratio": ce["ratio"], "end_to_end_ratio": e2e["ratio"]}))


if __name__ == "__main__":
    main()
