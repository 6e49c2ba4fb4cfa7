"""Few-label training sets: N examples drawn with a seed, the same for every model, disjoint parts of a corpus."""

import pytest
from conftest import tiny_config

from crosswrite_jax import workdir as workdir_lib
from crosswrite_jax.data.subsets import permuted_positions, seeded_subset


def test_permuted_ranges_partition_the_corpus():
    parts = [permuted_positions(100, 7, a, b) for a, b in ((0, 10), (10, 55), (55, 100))]
    assert [len(p) for p in parts] == [10, 45, 45]
    assert sorted(sum(parts, [])) == list(range(100))  # disjoint and complete
    assert parts[0] == permuted_positions(100, 7, 0, 10) != permuted_positions(100, 8, 0, 10)
    assert parts[0] != list(range(10))  # drawn, not the first ten
    with pytest.raises(ValueError):
        permuted_positions(100, 7, 20, 10)


def test_seeded_subset_keeps_order_and_is_the_first_part_of_the_permutation():
    items = [f"x{i}" for i in range(50)]
    subset = seeded_subset(items, 5, 3)
    assert subset == [items[i] for i in permuted_positions(50, 3, 0, 5)]
    assert subset == sorted(subset, key=items.index)
    assert seeded_subset(items, 0, 3) == items and seeded_subset(items, 80, 3) == items


def _run(tmp_path, **overrides):
    config = tiny_config(**overrides)
    return workdir_lib.Run(tmp_path, config, None)


def test_train_subset_seed_draws_the_same_pairs_for_any_model(tmp_path):
    """What training reads: read_split(train_split, data.max_train_examples)."""
    everything = _run(tmp_path).read_split("train")
    assert _run(tmp_path).read_split("train", 40) == everything[:40]  # no seed: the first N, as before
    seeded = dict(data__max_train_examples=40, data__train_subset_seed=0)
    drawn = _run(tmp_path, **seeded).read_split("train", 40)
    assert len(drawn) == 40 and drawn != everything[:40] and set(drawn) <= set(everything)
    assert _run(tmp_path, model__d_model=64, **seeded).read_split("train", 40) == drawn
    other_seed = _run(tmp_path, data__max_train_examples=40, data__train_subset_seed=1)
    assert other_seed.read_split("train", 40) != drawn
    assert _run(tmp_path, **seeded).read_split("val", 40) == _run(tmp_path).read_split("val", 40)  # train only


def test_train_subset_seed_draws_labeled_examples(tmp_path):
    (tmp_path / "train.tsv").write_text("".join(f"sentence {i}\t{i % 2}\n" for i in range(30)))
    spec = f"tsv:{tmp_path}/{{split}}.tsv?text=0&label=1"
    run = _run(tmp_path, task="classification", model__family="encoder", model__head="classification",
               model__num_decoder_layers=0, data__examples=spec, data__max_train_examples=6,
               data__train_subset_seed=2)
    drawn = run.read_examples("train", 6)
    assert len(drawn) == 6 and drawn != [(f"sentence {i}", str(i % 2)) for i in range(6)]
    assert drawn == run.read_examples("train", 6)
