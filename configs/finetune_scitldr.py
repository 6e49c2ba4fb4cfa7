"""SciTLDR-A summarization (abstract -> one-sentence TLDR; 1,992 train / 619 dev) from the span-corruption checkpoint.

Run (first `crosswrite train --config configs/pretrain_span_corruption.py --workdir runs/pretrain_span_corruption`):
    CROSSWRITE_DATA=../shared/data crosswrite train --config configs/finetune_scitldr.py --workdir runs/scitldr
    CROSSWRITE_DATA=../shared/data crosswrite eval --checkpoint runs/scitldr/best
ROUGE-1/2/L (rouge-score, stemmed, best over each paper's references) on dev. Greedy decoding: beam 4
(--config.decode.beam_size=4) preferred short generic sentences here and scored half the ROUGE. Abstracts
are cut to the backbone's 128 positions. Parameter-efficient variants: --config.peft.method=lora (or bitfit,
prompt, freeze).
"""

from crosswrite_jax.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    OptimizerConfig,
    PeftConfig,
    TrainConfig,
)
from crosswrite_jax.models.presets import t5


def get_config() -> Config:
    return Config(
        name="finetune_scitldr",
        task="summarization",
        model=t5("1.1", vocab_size=8000, d_model=256, num_heads=4, d_ff=768, num_encoder_layers=3,
                 num_decoder_layers=3, max_length=128, dropout_rate=0.1),
        data=DataConfig(examples="jsonl:summarization/scitldr/{split}.jsonl?source=source&target=target",
                        train_split="train", eval_split="dev", max_source_length=128, max_target_length=64,
                        bucket_lengths=(32, 64, 96, 128)),
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=40, schedule="cosine"),
        train=TrainConfig(steps=400, batch_size=32, label_smoothing=0.1, eval_every=100, eval_batches=8,
                          log_every=50, best_metric="rougeL", eval_decode_examples=100,
                          init_from="runs/pretrain_span_corruption", eval_at_start=True, early_stopping_patience=2),
        peft=PeftConfig(learning_rate=3e-3),
        eval=EvalConfig(split="dev", batch_size=128, max_decode_length=48),
        checkpoint=CheckpointConfig(every=400, max_to_keep=1),
    )
