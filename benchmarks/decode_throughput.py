"""Decoding throughput (generated tokens/s): this project's cached greedy and beam search against transformers'
PyTorch `generate`, on the same randomly initialized model and the same inputs, offline.

    python benchmarks/decode_throughput.py [--model t5|llama] [--batch 8] [--source-length 32] [--new-tokens 32]
        [--repeats 3]

t5: t5-small shapes; the source is the encoder's input. llama: a small Llama (d_model 512, 8 layers, 8 query and
4 key/value heads, d_ff 1,376, vocabulary 32,000); the source is the prompt, which both sides prefill in one pass.

Generated tokens are counted per row up to and including EOS (or the limit), on each side's own output.
Prints a table and a JSON line. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from crosswrite_jax import sharding  # noqa: E402
from crosswrite_jax.config import DecodeConfig  # noqa: E402
from crosswrite_jax.decode import make_decoder  # noqa: E402
from crosswrite_jax.models import hf  # noqa: E402
from crosswrite_jax.models.transformer import build_model, param_shapes  # noqa: E402

EOS = 1
T5_SMALL = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=EOS)


LLAMA_SMALL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048, bos_token_id=2,
                   eos_token_id=EOS, pad_token_id=0)


def model_pair(kind: str, seed: int = 0):
    """A random transformers model (T5 with t5-small shapes, or a small Llama) and our (model, params) converted
    from its safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    if kind == "t5":
        torch_model = T5ForConditionalGeneration(T5Config(**T5_SMALL)).eval()
    else:
        torch_model = LlamaForCausalLM(LlamaConfig(**LLAMA_SMALL)).eval()
    with tempfile.TemporaryDirectory() as directory:
        torch_model.save_pretrained(directory)
        hf_config, tensors = hf.read_checkpoint(directory)
    kind, config = hf.config_from_hf(hf_config, tensors)
    params = hf.params_from_hf(kind, config, tensors, param_shapes(config))
    return torch_model, build_model(config), jax.device_put(params)


def generated_tokens(ids: np.ndarray) -> int:
    """Tokens per row up to and including the first EOS (all of the row without one)."""
    total = 0
    for row in ids.tolist():
        total += row.index(EOS) + 1 if EOS in row else len(row)
    return total


def timed(run, repeats: int) -> tuple[np.ndarray, float, float]:
    """(output, first call seconds (compile included), median seconds of the next `repeats` calls)."""
    started = time.perf_counter()
    out = run()
    first = time.perf_counter() - started
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - started)
    return out, first, float(np.median(times))


def ours(model, params, inputs: np.ndarray, new_tokens: int, beams: int, repeats: int):
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    decode = make_decoder(model, DecodeConfig(beam_size=beams), new_tokens, EOS, sharding.replicated(mesh),
                          sharding.batch_sharding(mesh))
    batch = jax.device_put(inputs, sharding.batch_sharding(mesh))
    return timed(lambda: np.asarray(decode(params, batch)), repeats)


def theirs(torch_model, inputs: np.ndarray, new_tokens: int, beams: int, repeats: int):
    import torch

    ids = torch.tensor(inputs)

    def run():
        with torch.inference_mode():
            out = torch_model.generate(input_ids=ids, attention_mask=ids != 0, max_new_tokens=new_tokens,
                                       do_sample=False, num_beams=beams, length_penalty=1.0, pad_token_id=0)
        # without the decoder start token (T5) or the prompt (Llama)
        return out[:, 1 if torch_model.config.is_encoder_decoder else ids.shape[1]:].numpy()

    return timed(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("t5", "llama"), default="t5")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--source-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    torch_model, model, params = model_pair(args.model)
    rng = np.random.default_rng(0)
    vocab = (T5_SMALL if args.model == "t5" else LLAMA_SMALL)["vocab_size"]
    inputs = rng.integers(3, vocab, (args.batch, args.source_length)).astype(np.int32)
    if args.model == "t5":
        inputs[:, -1] = EOS
    shapes = "T5 t5-small shapes" if args.model == "t5" else "small Llama"
    print(f"{shapes}, random init; batch {args.batch}, source {args.source_length} tokens, up to "
          f"{args.new_tokens} new; jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print(f"{'method':8s} {'crosswrite tok/s':>17s} {'transformers tok/s':>19s} {'ratio':>6s} "
          f"{'compile s':>9s} {'same ids':>8s}")
    results = {}
    for name, beams in (("greedy", 1), ("beam 4", 4)):
        our_ids, compile_s, our_s = ours(model, params, inputs, args.new_tokens, beams, args.repeats)
        their_ids, _, their_s = theirs(torch_model, inputs, args.new_tokens, beams, args.repeats)
        our_rate, their_rate = generated_tokens(our_ids) / our_s, generated_tokens(their_ids) / their_s
        width = min(our_ids.shape[1], their_ids.shape[1])
        same = float(np.mean([(a[:width] == b[:width]).all() for a, b in zip(our_ids, their_ids)]))
        results[name] = {"crosswrite_tokens_per_s": round(our_rate), "transformers_tokens_per_s": round(their_rate),
                         "ratio": round(our_rate / their_rate, 2), "compile_s": round(compile_s, 1),
                         "same_ids_fraction": same}
        print(f"{name:8s} {our_rate:17.0f} {their_rate:19.0f} {our_rate / their_rate:6.2f} {compile_s:9.1f} "
              f"{same:8.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
