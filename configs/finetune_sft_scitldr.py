"""SciTLDR-A (abstract -> one-sentence TLDR) as prompt -> response fine-tuning (task sft) of the causal-LM
pretraining recipe's Llama-style decoder: the prompt is "ABSTRACT TL;DR:", the loss is on the summary and its EOS.

Run (first `crosswrite train --config configs/pretrain_causal_lm.py --workdir runs/pretrain_causal_lm`):
    CROSSWRITE_DATA=../shared/data crosswrite train --config configs/finetune_sft_scitldr.py --workdir runs/sft_scitldr
    CROSSWRITE_DATA=../shared/data crosswrite eval --checkpoint runs/sft_scitldr/best
From scratch, the same model and tokenizer (the comparison):
    ... --config.train.init_from= --config.data.tokenizer=runs/pretrain_causal_lm/tokenizer
ROUGE-1/2/L (rouge-score, stemmed, best over each paper's references; eval.sft_metric=rouge) on dev. An abstract
keeps its last 95 tokens (the prompt's end, "TL;DR:", always stays), a summary its first 31, in rows of 128.
"""

import dataclasses

import finetune_sft_mt

from crosswrite_jax.config import CheckpointConfig, Config, DataConfig, EvalConfig, OptimizerConfig, TrainConfig


def get_config() -> Config:
    return dataclasses.replace(
        finetune_sft_mt.get_config(),  # its model: the pretraining recipe's decoder, dropout 0.1
        name="finetune_sft_scitldr",
        data=DataConfig(examples="jsonl:summarization/scitldr/{split}.jsonl?source=source&target=target",
                        train_split="train", eval_split="dev", prompt_template="{source} TL;DR:",
                        max_source_length=96, max_target_length=32, packing=True, bucket_lengths=(32, 64, 96)),
        optimizer=OptimizerConfig(learning_rate=5e-4, warmup_steps=40, schedule="cosine"),
        train=TrainConfig(steps=600, batch_size=16, label_smoothing=0.1, eval_every=100, eval_batches=8,
                          log_every=50, best_metric="rougeL", eval_decode_examples=100, early_stopping_patience=2,
                          eval_at_start=True, logits_chunk_length=16, init_from=finetune_sft_mt.PRETRAINED),
        checkpoint=CheckpointConfig(every=600, max_to_keep=1),
        eval=EvalConfig(split="dev", batch_size=128, max_decode_length=32, sft_metric="rouge"),
    )
