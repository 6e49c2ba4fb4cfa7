"""Few-pair English->German translation: fine-tuned on 10% of Multi30k from the monolingual denoising run.

Run (first `crosswrite train --config configs/pretrain_mt_monolingual.py --workdir runs/pretrain_mt_monolingual`):
    CROSSWRITE_DATA=../shared/data crosswrite train --config configs/finetune_mt.py --workdir runs/mt_pretrained
    CROSSWRITE_DATA=../shared/data crosswrite eval --checkpoint runs/mt_pretrained/best --split test_2016_flickr
The same model and tokenizer from scratch (the comparison; the pretraining never saw these 2,900 pairs):
    ... --config.train.init_from= --config.data.tokenizer=runs/pretrain_mt_monolingual/tokenizer
Another seed: --config.train.seed=S (the pairs stay the same: data.train_subset_seed). Another share of the pairs:
--config.data.max_train_examples=290 (1%), or 0 for all 29,000 (those overlap the pretraining text).
Validation decodes 300 val pairs every 100 steps and keeps the best BLEU in best/; cased, detokenized sacreBLEU.
"""

import dataclasses

import mt_multi30k
import pretrain_mt_monolingual

from crosswrite_jax.config import CheckpointConfig, Config, OptimizerConfig, TrainConfig

PRETRAINED = "runs/pretrain_mt_monolingual"
STEPS = 600


def get_config() -> Config:
    base = mt_multi30k.get_config()
    return dataclasses.replace(
        base,
        name="finetune_mt",
        # mt_multi30k's model, dropout 0.1 included (0.3, advised for few pairs by Sennrich & Zhang 2019, cost scratch
        # and pretrained runs about 6 BLEU here), and its packed 64-token rows, on the 2,900 labeled pairs (part L of
        # the split that pretrain_mt_monolingual.py reads E and G from).
        data=dataclasses.replace(base.data, max_train_examples=pretrain_mt_monolingual.LABELED_PAIRS,
                                 train_subset_seed=0),
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=100, schedule="cosine",
                                  end_learning_rate_ratio=0.02),
        # 600 steps of 16 rows (about 48 pairs): 10 passes over the pairs, stopped early when validation BLEU has
        # not improved for three validations.
        train=TrainConfig(steps=STEPS, batch_size=16, label_smoothing=0.1, eval_every=100, eval_batches=8,
                          log_every=100, best_metric="bleu", eval_decode_examples=300, early_stopping_patience=3,
                          eval_at_start=True, logits_chunk_length=16, init_from=PRETRAINED),
        checkpoint=CheckpointConfig(every=STEPS, max_to_keep=1),
    )
