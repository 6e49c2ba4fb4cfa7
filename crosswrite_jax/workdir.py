"""A run directory: config.json, metrics.jsonl, checkpoints/, tokenizer/, tensorboard/."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax

from crosswrite_jax import config as config_lib
from crosswrite_jax.config import Config
from crosswrite_jax.data import sources, subsets, text_sources
from crosswrite_jax.data.tokenizer import PAD_ID, Tokenizer, save_new, train_cached
from crosswrite_jax.errors import UserError
from crosswrite_jax.tasks import check_config, get_task

CONFIG_FILE, CHECKPOINTS, TOKENIZER = "config.json", "checkpoints", "tokenizer"
BEST = "best"  # the checkpoint with the best validation metric (train.best_metric)
NUM_SENTINELS = 100  # <extra_id_0> ... <extra_id_99>, as T5


@dataclass
class Run:
    """What a command needs from a run directory."""

    workdir: Path
    config: Config
    tokenizer: Tokenizer

    @property
    def checkpoint_dir(self) -> Path:
        return self.workdir / CHECKPOINTS

    def read_split(self, split: str, max_examples: int = 0) -> list[tuple[str, str]]:
        """(source, target) pairs: data.dataset's parallel files, or data.examples (one pair per reference)."""
        d = self.config.data
        if not d.examples:
            if self._seeded(split, max_examples):
                pairs = sources.read_parallel(self.dataset_path(), split, d.source_lang, d.target_lang)
                return subsets.seeded_subset(pairs, max_examples, d.train_subset_seed)
            return sources.read_parallel(self.dataset_path(), split, d.source_lang, d.target_lang, max_examples)
        return [(source, reference) for source, references in self.read_examples(split, max_examples)
                for reference in references]

    def _seeded(self, split: str, max_examples: int) -> bool:
        """Whether the N examples kept of this split are drawn with data.train_subset_seed (else the first N)."""
        d = self.config.data
        return max_examples > 0 and d.train_subset_seed >= 0 and split == d.train_split

    def dataset_path(self) -> str:
        """data.dataset, a relative folder found under data.data_dir or $CROSSWRITE_DATA when not in the cwd."""
        d = self.config.data
        path = Path(d.dataset).expanduser()
        if d.dataset == sources.BUNDLED or path.is_absolute() or path.exists():
            return d.dataset
        root = d.data_dir or os.environ.get("CROSSWRITE_DATA", "")
        return str(Path(root) / path) if root and (Path(root) / path).exists() else d.dataset

    def read_references(self, split: str, max_examples: int = 0) -> tuple[list[str], list[list[str]]]:
        """Sources and every reference of each (summaries may have several), for scoring."""
        if not self.config.data.examples:
            pairs = self.read_split(split, max_examples)
            return [s for s, _ in pairs], [[t] for _, t in pairs]
        examples = self.read_examples(split, max_examples)
        return [s for s, _ in examples], [refs for _, refs in examples]

    def read_examples(self, split: str, max_examples: int = 0) -> list:
        """The labeled examples of a split from data.examples (see crosswrite_jax/data/labeled.py)."""
        from crosswrite_jax.data import labeled

        d = self.config.data
        if not d.examples:
            raise UserError(f"task '{self.config.task}' reads labeled examples, but config key 'data.examples' is "
                            f"empty; name them there, e.g. "
                            f"--config.data.examples='tsv:sst2/{{split}}.tsv?text=0&label=1'")
        if self._seeded(split, max_examples):
            examples = labeled.read_examples(self.config.task, d.examples, split, d.data_dir or None)
            return subsets.seeded_subset(examples, max_examples, d.train_subset_seed)
        return labeled.read_examples(self.config.task, d.examples, split, d.data_dir or None, max_examples)

    def documents(self, spec: str):
        """The documents of one raw-text source spec (data.sources / data.eval_sources)."""
        return text_sources.read_documents(spec, self.config.data.data_dir or None)


def has_checkpoints(workdir: Path) -> bool:
    """Whether any step directory exists under workdir/checkpoints."""
    folder = workdir / CHECKPOINTS
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def prepare(config: Config, workdir: str | Path) -> Run:
    """Makes the run directory and provides the tokenizer (reused on resume), after checking that an existing run
    can take this config. The config itself is written by `record_config`, once everything else has passed."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir '{workdir}' is a file; pass a directory")
    workdir.mkdir(parents=True, exist_ok=True)
    saved_path = workdir / CONFIG_FILE
    if saved_path.exists() and has_checkpoints(workdir):
        _check_compatible(config_lib.load_json(saved_path), config, saved_path)
    tokenizer = _tokenizer(config, workdir)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but config key 'model.vocab_size' is "
                        f"{config.model.vocab_size}; raise model.vocab_size to at least {tokenizer.vocab_size}")
    if tokenizer.pad_id != PAD_ID:
        raise UserError(f"the tokenizer's pad id is {tokenizer.pad_id}; models here need pad id {PAD_ID}")
    return Run(workdir, config, tokenizer)


def record_config(run: Run) -> None:
    """Writes the run's config.json (atomically, on process 0)."""
    if jax.process_index() == 0:
        config_lib.save_json(run.config, run.workdir / CONFIG_FILE)


def _check_compatible(saved: Config, new: Config, path: Path) -> None:
    """Resuming with another architecture would corrupt the run: refuse it, naming the key."""
    old_model, new_model = dataclasses.asdict(saved.model), dataclasses.asdict(new.model)
    for key, value in old_model.items():
        if new_model[key] != value and key not in ("dropout_rate", "dtype", "remat", "attention_kernel"):
            raise UserError(
                f"{path}: the checkpoints here were trained with model.{key}={value!r}, not {new_model[key]!r};"
                f" use a new --workdir or drop the override")


def _tokenizer(config: Config, workdir: Path) -> Tokenizer:
    folder = workdir / TOKENIZER
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.load(folder)
    d = config.data
    cached = None  # the tokenizer cache's folder of a trained tokenizer: its files are copied, not written again
    if d.tokenizer:
        tokenizer = Tokenizer.load(d.tokenizer)
    elif config.train.init_from and (_init_tokenizer(config) / "tokenizer.json").is_file():
        tokenizer = Tokenizer.load(_init_tokenizer(config))  # keep the tokenizer the starting point learned
    elif get_task(config.task).pretraining:
        if not d.sources:
            raise UserError(f"task '{config.task}' reads raw text, but config key 'data.sources' is empty; name "
                            f"files there, e.g. --config.data.sources='text:corpus/*.txt'")
        texts = _tokenizer_sample([text_sources.read_documents(s, d.data_dir or None)
                                   for s in d.sources + d.tokenizer_sources])
        tokenizer, cached = train_cached(texts, config.model.vocab_size, d.tokenizer_model, mask=True,
                                         sentinels=NUM_SENTINELS)
    else:
        extra = [doc for s in d.tokenizer_sources for doc in text_sources.read_documents(s, d.data_dir or None)]
        tokenizer, cached = train_cached(_training_texts(config, workdir) + extra, config.model.vocab_size,
                                         d.tokenizer_model)
    if jax.process_index() == 0:  # tokenizer.json lands last, by rename: other processes never read half a file
        save_new(tokenizer, folder, force=True, files_from=cached)
    return tokenizer


def _training_texts(config: Config, workdir: Path) -> list[str]:
    """The text of the training split, both sides (or the words of tagged sentences), to learn a vocabulary on."""
    run = Run(workdir, config, None)
    if get_task(config.task).labeled:
        examples = run.read_examples(config.data.train_split)
        return [text if isinstance(text, str) else " ".join(text) for text, _ in examples]
    pairs = run.read_split(config.data.train_split)
    return [s for s, _ in pairs] + [t for _, t in pairs]


def _init_tokenizer(config: Config) -> Path:
    """The tokenizer folder of the run (or Hugging Face model directory) that train.init_from names."""
    if is_hf_model_directory(config.train.init_from):
        return Path(config.train.init_from)
    return locate_checkpoint(config.train.init_from)[0] / TOKENIZER


def is_hf_model_directory(path: str | Path) -> bool:
    """A Hugging Face model folder (config.json beside safetensors weights), not a run directory."""
    path = Path(path)
    weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    return weights and not (path / CHECKPOINTS).is_dir()


def _tokenizer_sample(sources_: list, max_characters: int = 50_000_000) -> list[str]:
    """Documents from every source in turn (round robin), up to a character budget, to train a tokenizer on."""
    texts, total = [], 0
    for i in range(max(len(s) for s in sources_)):
        for documents in sources_:
            if i < len(documents):
                texts.append(documents[i])
                total += len(texts[-1])
        if total >= max_characters:
            break
    return texts


def check_tokenizer(metadata: dict[str, Any], tokenizer: Tokenizer, where: Path) -> None:
    """Fails when a checkpoint was trained with a different tokenizer."""
    saved = metadata.get("tokenizer_fingerprint")
    if saved and saved != tokenizer.fingerprint:
        raise UserError(f"{where}: the checkpoint was trained with tokenizer {saved[:12]}, but the run's tokenizer "
                        f"is {tokenizer.fingerprint[:12]}; restore the original tokenizer/ directory")


def load_run(workdir: str | Path, overrides: dict[str, Any] | None = None) -> Run:
    """An existing run directory, its saved config (with overrides) and tokenizer, for evaluation."""
    workdir = Path(workdir)
    path = workdir / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"--workdir '{workdir}' has no {CONFIG_FILE}; point it at a directory written by "
                        f"`crosswrite train`")
    config = config_lib.load_json(path)
    if overrides:
        config = config_lib.override(config, overrides)
    check_config(config)
    folder = workdir / TOKENIZER
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"--workdir '{workdir}' has no {TOKENIZER}/tokenizer.json; it is needed to decode")
    return Run(workdir, config, Tokenizer.load(folder))


def locate_checkpoint(path: str | Path) -> tuple[Path, Path, int | None]:
    """(run directory, checkpoints directory, step or None for newest) for a run dir, its checkpoints/ or a step."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path, path / CHECKPOINTS, None
    if path.name in (CHECKPOINTS, BEST) and (path.parent / CONFIG_FILE).is_file():
        return path.parent, path, None
    if path.name.isdigit() and (path.parent.parent / CONFIG_FILE).is_file():
        return path.parent.parent, path.parent, int(path.name)
    raise UserError(f"'{path}' is neither a run directory (with {CONFIG_FILE}) nor one of its checkpoints")
