"""A LoRA-tuned decoder leaves as a Hugging Face model: import a random Llama, tune LoRA adapters on text, merge them,
export with `export-hf`, and transformers' greedy `generate` on the exported folder gives our greedy ids."""

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from conftest import restore_run
from flax import traverse_util
from transformers import LlamaConfig, LlamaForCausalLM

from crosswrite_jax import cli
from crosswrite_jax import config as config_lib
from crosswrite_jax.decode import greedy_decode
from crosswrite_jax.models.transformer import build_model
from crosswrite_jax.train import train

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 600
EOS = 2


def _random_llama(path: Path) -> None:
    """A tiny Llama with weights far enough from zero that its greedy choices are clear (no near-ties)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=EOS, pad_token_id=0,
        tie_word_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval().save_pretrained(path)


def _text(root: Path) -> Path:
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    root.mkdir()
    (root / "train.txt").write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(200)) + "\n")
    return root


@pytest.mark.slow  # an import, a LoRA training, a merge, an export and transformers' generate
def test_lora_merged_llama_exports_and_transformers_generates_our_greedy_ids(tmp_path, monkeypatch):
    _random_llama(tmp_path / "hf")
    assert cli.main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "imported")]) == 0
    imported = config_lib.load_json(tmp_path / "imported" / "config.json")

    recipe = config_lib.load(ROOT / "configs" / "pretrain_causal_lm.py")
    monkeypatch.chdir(tmp_path)  # a relative train.init_from
    config = config_lib.override(dataclasses.replace(recipe, model=imported.model), {
        "model.dropout_rate": 0.0, "data.data_dir": str(_text(tmp_path / "text")),
        "data.sources": ("text:train.txt",), "data.mixture_weights": (), "data.eval_sources": (),
        "data.max_source_length": 32, "data.max_target_length": 32, "train.init_from": "imported",
        "train.batch_size": 8, "train.steps": 4, "train.eval_every": 0, "train.eval_at_start": False,
        "train.progress_bar": False, "checkpoint.every": 4, "checkpoint.async_save": False,
        "optimizer.learning_rate": 3e-2, "optimizer.warmup_steps": 0,
        "peft.method": "lora", "peft.lora_rank": 4,
        "peft.lora_targets": ".*self_attention/(query|key|value|out)|.*/mlp/(wi_[01]|wo)"})
    train(config, tmp_path / "lora")
    _, tuned = restore_run(tmp_path / "lora")
    adapters = {k: v for k, v in traverse_util.flatten_dict(tuned, sep="/").items() if k.endswith("lora_b")}
    assert adapters and all(np.abs(v).max() > 0 for v in adapters.values())  # the adapters trained away from zero

    assert cli.main(["peft", "merge", "--workdir", "lora", "--out", "merged"]) == 0
    assert cli.main(["export-hf", "merged", "exported"]) == 0
    merged_config, merged = restore_run(tmp_path / "merged")
    assert not any("lora_" in k for k in traverse_util.flatten_dict(merged, sep="/"))

    _, base = restore_run(tmp_path / "imported")
    model = build_model(merged_config.model)
    rows = [[1, 5, 6, 7, 8, 9], [1, 13, 14], [1, 40, 41, 42, 43]]
    left = np.array([[0] * (6 - len(r)) + r for r in rows])
    greedy = jax.jit(lambda p, x: greedy_decode(model, p, x, 8, eos_id=EOS))
    ours = np.asarray(greedy(merged, left))
    assert not np.array_equal(ours, np.asarray(greedy(base, left)))  # the merged adapters change the output

    hf_model = LlamaForCausalLM.from_pretrained(tmp_path / "exported").eval()
    with torch.no_grad():
        theirs = hf_model.generate(input_ids=torch.tensor(left), attention_mask=torch.tensor(left != 0),
                                   max_new_tokens=8, do_sample=False, num_beams=1, pad_token_id=0).numpy()
    theirs = theirs[:, left.shape[1]:]
    np.testing.assert_array_equal(ours[:, :theirs.shape[1]], theirs)
    assert (ours[:, theirs.shape[1]:] == 0).all()  # transformers stops once every row has ended; ours pads

