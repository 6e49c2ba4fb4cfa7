"""Multi30k English->German as prompt -> response fine-tuning (task sft) of the causal-LM pretraining recipe's
Llama-style decoder: the prompt is "English: SOURCE German:", the loss is on the German response and its EOS only.

Run (first `crosswrite train --config configs/pretrain_causal_lm.py --workdir runs/pretrain_causal_lm`):
    CROSSWRITE_DATA=../shared/data crosswrite train --config configs/finetune_sft_mt.py --workdir runs/sft_mt
    CROSSWRITE_DATA=../shared/data crosswrite eval --checkpoint runs/sft_mt/best --split test_2016_flickr
    crosswrite predict --workdir runs/sft_mt --input sentences.en.txt   # one German response per English line
The same model and tokenizer from scratch (the comparison):
    ... --config.train.init_from= --config.data.tokenizer=runs/pretrain_causal_lm/tokenizer
The vocabulary is the pretraining run's, learned on English text: German words split into more pieces. Validation
decodes 300 val prompts greedily every 250 steps and keeps the best BLEU in best/; cased, detokenized sacreBLEU
(BLEU and chrF, eval.sft_metric=sacrebleu).
"""

import dataclasses

import pretrain_causal_lm

from crosswrite_jax.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    DecodeConfig,
    EvalConfig,
    OptimizerConfig,
    TrainConfig,
)

PRETRAINED = "runs/pretrain_causal_lm"
STEPS = 2000


def get_config() -> Config:
    base = pretrain_causal_lm.get_config()
    return Config(
        name="finetune_sft_mt",
        task="sft",
        # The pretraining recipe's decoder (4 layers, d 256, RoPE, 128 positions) with dropout 0.1.
        model=dataclasses.replace(base.model, dropout_rate=0.1),
        # Prompts of up to 64 tokens (the start token included) and responses of up to 64 (EOS included), packed
        # into rows of 128: pairs never attend to each other.
        data=DataConfig(dataset="multi30k", source_lang="en", target_lang="de", train_split="train", eval_split="val",
                        prompt_template="English: {source} German:", max_source_length=64, max_target_length=64,
                        packing=True, bucket_lengths=(16, 32, 48, 64)),
        optimizer=OptimizerConfig(learning_rate=5e-4, warmup_steps=100, schedule="cosine",
                                  end_learning_rate_ratio=0.02),
        train=TrainConfig(steps=STEPS, batch_size=16, label_smoothing=0.1, eval_every=250, eval_batches=8,
                          log_every=100, best_metric="bleu", eval_decode_examples=300, early_stopping_patience=3,
                          eval_at_start=True, logits_chunk_length=16, init_from=PRETRAINED),
        checkpoint=CheckpointConfig(every=250, max_to_keep=1),
        eval=EvalConfig(split="test_2016_flickr", batch_size=200, max_decode_length=64, sft_metric="sacrebleu"),
        decode=DecodeConfig(beam_size=1),
    )
