"""Multi30k English->German translation fine-tuned from the span-corruption checkpoint, on 10% of the pairs.

Run (first `crosswrite train --config configs/pretrain_span_corruption.py --workdir runs/pretrain_span_corruption`):
    CROSSWRITE_DATA=../shared/data crosswrite train --config configs/finetune_mt_span_corruption.py \
        --workdir runs/mt_pretrained
    CROSSWRITE_DATA=../shared/data crosswrite eval --workdir runs/mt_pretrained --split test_2016_flickr
The same model from scratch, with the same tokenizer (a controlled comparison):
    CROSSWRITE_DATA=../shared/data crosswrite train --config configs/finetune_mt_span_corruption.py \
        --workdir runs/mt_scratch \
        --config.train.init_from= --config.data.tokenizer=runs/pretrain_span_corruption/tokenizer
All 29,000 pairs: --config.data.max_train_examples=0. Cased, detokenized sacreBLEU and chrF.
"""

from crosswrite_jax.config import CheckpointConfig, Config, DataConfig, EvalConfig, OptimizerConfig, TrainConfig
from crosswrite_jax.models.presets import t5

PRETRAINED = "runs/pretrain_span_corruption"


def get_config() -> Config:
    return Config(
        name="finetune_mt",  # the name its earlier runs were saved under
        task="translation",
        # The span-corruption recipe's model (T5 v1.1 layout, 3+3 layers, d 256), with dropout for fine-tuning.
        model=t5("1.1", vocab_size=8000, d_model=256, num_heads=4, d_ff=768, num_encoder_layers=3,
                 num_decoder_layers=3, max_length=128, dropout_rate=0.1),
        data=DataConfig(dataset="multi30k", source_lang="en", target_lang="de", max_train_examples=2900,
                        max_source_length=64, max_target_length=64, bucket_lengths=(16, 32, 48, 64)),
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=40, schedule="cosine"),
        # 1,200 steps of 32 pairs: 13 passes over the 2,900 pairs (400 steps left both runs near 1 BLEU).
        train=TrainConfig(steps=1200, batch_size=32, label_smoothing=0.1, eval_every=300, eval_batches=8,
                          log_every=50, best_metric="bleu", eval_decode_examples=100, init_from=PRETRAINED,
                          eval_at_start=True, early_stopping_patience=2),
        eval=EvalConfig(split="test_2016_flickr", batch_size=200, max_decode_length=64),
        checkpoint=CheckpointConfig(every=1200, max_to_keep=1),
    )
