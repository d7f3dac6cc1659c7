"""A retrain's weighted rows: the fine-tuning loader draws them in proportion to their `weight`."""
import pytest
import torch

from components.training import finetune_data as fd


class Rows(torch.utils.data.Dataset):
    def __init__(self, weights):
        self.weights = weights
        self.lengths = [1 + i % 7 for i in range(len(weights))]

    def __len__(self):
        return len(self.weights)

    def __getitem__(self, i):
        return i


def test_weighted_rows_get_their_share_of_the_draws():
    # 90 base rows of weight 1 and 10 new rows of weight 0.3/0.7*90/10: the new rows are 30% of the draws.
    weights = [1.0] * 90 + [0.3 / 0.7 * 9] * 10
    loader = fd.loader(Rows(weights), 10, lambda b: b, shuffle=True, seed=3)
    draws = [i for _ in range(40) for batch in loader for i in batch]
    share = sum(i >= 90 for i in draws) / len(draws)
    assert len(draws) == 40 * 100 and abs(share - 0.3) < 0.03


def test_unweighted_rows_are_a_plain_seeded_shuffle():
    loader = fd.loader(Rows([1.0] * 20), 5, lambda b: b, shuffle=True, seed=3)
    assert sorted(i for batch in loader for i in batch) == list(range(20))    # each row once per epoch
    assert fd.row_weights([{"weight": 4}, {}]) == [4.0, 1.0]


def test_length_grouped_batches_pad_to_near_neighbours():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(10, 250) for _ in range(400)]
    sampler = fd.LengthGroupedSampler(lengths, 8, torch.Generator().manual_seed(1))
    order = list(sampler)
    assert sorted(order) == list(range(400))                 # an epoch: every row once
    batches = [order[i:i + 8] for i in range(0, 400, 8)]
    padded = sum(8 * max(lengths[i] for i in b) for b in batches)
    rand = torch.randperm(400, generator=torch.Generator().manual_seed(1)).tolist()
    padded_random = sum(8 * max(lengths[i] for i in rand[j:j + 8]) for j in range(0, 400, 8))
    assert padded < 0.7 * padded_random                      # far less padding than random batches
    assert list(fd.LengthGroupedSampler(lengths, 8, torch.Generator().manual_seed(1))) == order  # seeded


@pytest.mark.parametrize("weights", [None, [1.0] * 50 + [6.0] * 20])
def test_a_resumed_sampler_continues_the_uninterrupted_order_across_epochs(weights):
    """start_batch = k yields what the uninterrupted sampler yields after its k-th batch (70 rows, batch 8:
    9 batches an epoch, the last partial), k inside the first epoch and in the third."""
    lengths = [(i * 37) % 101 + 1 for i in range(70)]

    def stream(start_batch: int, epochs: int) -> list[int]:
        s = fd.LengthGroupedSampler(lengths, 8, torch.Generator().manual_seed(3), weights, start_batch)
        return [i for _ in range(epochs) for i in s]

    whole = stream(0, 4)
    per_epoch = len(whole) // 4
    assert per_epoch == 70
    for k in (3, 20):
        epoch, within = divmod(k, 9)
        resumed = stream(k, 4 - epoch)      # the resumed run's first pass is the rest of epoch `epoch`
        assert resumed == whole[epoch * 70 + within * 8:]
