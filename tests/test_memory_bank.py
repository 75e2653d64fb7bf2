"""The memory bank of module I (paper eq. 3): a FIFO queue read by temperature attention."""

from collections import deque

import pytest
import torch

from acsleuth_core.nn.blocks import MemoryBank, mlp

SIZE, DIM = 5, 3


def _rows(start: int, count: int) -> torch.Tensor:
    """Rows that name themselves: row k is (k, k + 0.1, k + 0.2)."""
    k = torch.arange(start, start + count, dtype=torch.float32)[:, None]
    return k + torch.tensor([0.0, 0.1, 0.2])


@pytest.mark.parametrize(
    "chunks",
    [
        [1, 1, 1, 1, 1, 1, 1],  # one at a time, wraps after five
        [2, 2, 3],  # the third write wraps around the end of the buffer
        [3, 8],  # a batch larger than the bank written from a non-zero pointer
        [5, 5],  # exactly the bank size, twice
        [4, 12, 2],  # larger than the bank from pointer 4, then a small write
        [7],  # larger than the bank into an empty pointer
    ],
)
def test_memory_bank_drops_oldest_first(chunks):
    bank = MemoryBank(SIZE, DIM)
    written: deque = deque(maxlen=SIZE)
    start = 0
    for n in chunks:
        rows = _rows(start, n)
        bank.enqueue(rows)
        written.extend(rows)
        start += n
        kept = min(start, SIZE)
        newest = bank.oldest_to_newest()[-kept:]
        torch.testing.assert_close(newest, torch.stack(list(written))[-kept:], rtol=0, atol=0)
    if start >= SIZE:
        # once full, the whole bank is exactly the last SIZE rows written, oldest first
        torch.testing.assert_close(bank.oldest_to_newest(), torch.stack(list(written)), rtol=0, atol=0)


def test_memory_bank_keeps_its_size_and_pointer_in_range():
    bank = MemoryBank(SIZE, DIM)
    for n in (3, 9, 1, 5, 2):
        bank.enqueue(torch.randn(n, DIM))
        assert bank.queue.shape == (SIZE, DIM)
        assert 0 <= int(bank.pointer) < SIZE
        assert bank.oldest_to_newest().shape == (SIZE, DIM)


def test_memory_bank_needs_at_least_one_slot():
    with pytest.raises(ValueError):
        MemoryBank(0, DIM)


def test_attention_rows_are_non_negative_and_sum_to_one():
    torch.manual_seed(0)
    bank = MemoryBank(16, 8, temperature=0.7)
    z = 3 * torch.randn(10, 8)
    weights = bank.attention(z)
    assert weights.shape == (10, 16)
    assert torch.all(weights >= 0)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(10))


def test_memory_read_is_a_convex_combination_of_the_bank():
    torch.manual_seed(1)
    bank = MemoryBank(16, 8)
    z = 5 * torch.randn(12, 8)
    read = bank.read(z)
    weights = bank.attention(z)
    torch.testing.assert_close(read, weights @ bank.queue)
    # a convex combination stays inside the bank's bounding box, coordinate by coordinate
    low, high = bank.queue.min(dim=0).values, bank.queue.max(dim=0).values
    assert torch.all(read >= low - 1e-6)
    assert torch.all(read <= high + 1e-6)


def test_memory_read_matches_eq3_formula():
    """``z̃ = Qᵀ softmax(Q z / τ)``, written out for one vector."""
    torch.manual_seed(2)
    bank = MemoryBank(6, 4, temperature=0.5)
    z = torch.randn(4)
    expected = bank.queue.T @ torch.softmax(bank.queue @ z / 0.5, dim=0)
    torch.testing.assert_close(bank.read(z[None, :])[0], expected)


def test_enqueue_does_not_carry_gradients():
    torch.manual_seed(3)
    encoder = mlp([4, 8, 3])
    bank = MemoryBank(SIZE, 3)
    z = encoder(torch.randn(4, 4))
    assert z.requires_grad
    bank.enqueue(z)
    assert not bank.queue.requires_grad
    assert bank.queue.grad_fn is None
    # the stored copy is detached: later changes to z do not reach the bank
    stored = bank.oldest_to_newest()[-4:].clone()
    with torch.no_grad():
        z.mul_(0.0)
    torch.testing.assert_close(bank.oldest_to_newest()[-4:], stored)
    # reading through the bank still lets gradients reach the encoder, not the bank
    bank.read(encoder(torch.randn(2, 4))).sum().backward()
    assert all(p.grad is not None for p in encoder.parameters())
    assert bank.queue.grad is None


def test_memory_bank_is_not_a_trainable_parameter():
    bank = MemoryBank(SIZE, DIM)
    assert list(bank.parameters()) == []
    assert set(bank.state_dict()) == {"queue", "pointer"}


def test_lower_temperature_gives_sharper_attention():
    torch.manual_seed(4)
    warm, cold = MemoryBank(32, 8, temperature=2.0), MemoryBank(32, 8, temperature=0.1)
    cold.queue.copy_(warm.queue)
    z = torch.randn(20, 8)
    warm_max = warm.attention(z).max(dim=1).values
    cold_max = cold.attention(z).max(dim=1).values
    assert torch.all(cold_max > warm_max)


def test_temperature_limits_uniform_and_one_hot():
    torch.manual_seed(5)
    hot, frozen = MemoryBank(10, 4, temperature=1e6), MemoryBank(10, 4, temperature=1e-4)
    frozen.queue.copy_(hot.queue)
    z = torch.randn(6, 4)
    torch.testing.assert_close(hot.attention(z), torch.full((6, 10), 0.1), rtol=0, atol=1e-4)
    one_hot = frozen.attention(z)
    torch.testing.assert_close(one_hot.max(dim=1).values, torch.ones(6), rtol=0, atol=1e-4)
    assert torch.equal(one_hot.argmax(dim=1), (z @ frozen.queue.T).argmax(dim=1))
