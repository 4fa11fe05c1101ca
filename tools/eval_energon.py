"""Evaluation of megatron-energon as the stage-1 loader (not used in CI; energon is not a dependency).

    python3 -m venv /tmp/ev && . /tmp/ev/bin/activate && pip install torch==2.13.0 megatron-energon==7.4.1
    energon prepare --non-interactive --split-ratio 1,0,0 --sample-type CrudeWebdataset SHARD_DIR
    python tools/eval_energon.py SHARD_DIR 2 2   # save after 15 samples with 2 workers, restore with 2
    python tools/eval_energon.py SHARD_DIR 2 1   # ... restore with 1 worker

Prints whether the 30 samples after the restore equal those after the save. Our shards
(`moca data prepare` / `moca data demo`) are plain webdataset tars that `energon prepare` indexes.
"""
import sys
from dataclasses import dataclass

from megatron.energon import (Cooker, DefaultTaskEncoder, Sample, WorkerConfig, basic_sample_keys,
                              get_savable_loader, get_train_dataset, stateless)


@dataclass
class Doc(Sample):
    images: int


@stateless
def cook(sample: dict) -> Doc:
    return Doc(**basic_sample_keys(sample), images=sum(1 for k in sample if k.startswith("img")))


class KeysOnly(DefaultTaskEncoder):
    cookers = [Cooker(cook)]

    def batch(self, samples):
        return [s.__key__ for s in samples]


def loader(path, workers):
    config = WorkerConfig(rank=0, world_size=1, num_workers=workers)
    return get_savable_loader(get_train_dataset(path, batch_size=1, shuffle_buffer_size=10,
                                                max_samples_per_sequence=5, task_encoder=KeysOnly(),
                                                worker_config=config))


if __name__ == "__main__":
    path, before, after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    first = loader(path, before)
    it = iter(first)
    for _ in range(15):
        next(it)
    state = first.save_state_rank()
    expected = [next(it)[0] for _ in range(30)]
    second = loader(path, after)
    second.restore_state_rank(state)
    it2 = iter(second)
    print(f"workers {before} -> {after}: identical after restore: {[next(it2)[0] for _ in range(30)] == expected}")
