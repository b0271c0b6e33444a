"""The gather-based window layout equals the official pad -> roll -> partition -> ... -> crop sequence,
in outputs and gradients, for every kind of size, window and shift."""
import pytest
import torch
import torch.nn.functional as F

from mmswin.models.attention import WindowAttention
from mmswin.models.blocks import SwinBlock
from mmswin.models.windows import balanced_bounds, relative_position_index, shift_mask, window_chunks


def official_partition(x, window):
    """(B, H, W, C) -> (B * windows, wh * ww, C), windows in row-major order, as the official code."""
    b, hp, wp, c = x.shape
    wh, ww = window
    return x.view(b, hp // wh, wh, wp // ww, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, c)


def reference(x, window, shift, fn):
    """The official detection backbone's sequence, written out plainly."""
    b, h, w, c = x.shape
    wh, ww = window
    x = F.pad(x, (0, 0, 0, -w % ww, 0, -h % wh))
    hp, wp = x.shape[1:3]
    x = torch.roll(x, (-shift[0], -shift[1]), (1, 2))
    win = fn(official_partition(x, window))
    x = win.view(b, hp // wh, wp // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    x = torch.roll(x, shift, (1, 2))
    return x[:, :h, :w]


class OrderSensitive(torch.nn.Module):
    """Stands in for attention: depends on which tokens share a window and on their order in it."""

    def forward(self, windows, window, mask):
        return windows.cumsum(dim=1) * torch.linspace(0.5, 1.5, windows.shape[1]).view(1, -1, 1)

    def attends_rows(self, x, window):
        return False  # it takes the padded windows, as attention without the compiled kernels


@pytest.mark.parametrize('method', ['window_attention', '_window_attention_rolled'])
@pytest.mark.parametrize('hw', [(14, 14), (15, 22), (7, 7), (5, 9), (30, 17)])
@pytest.mark.parametrize('window,shift', [((7, 7), (0, 0)), ((7, 7), (3, 3)), ((4, 4), (2, 2)), ((5, 8), (0, 4))])
def test_window_layout_equals_pad_roll_partition(hw, window, shift, method):
    """Both forms: the cached gather (eager) and the rolled one (torch.compile)."""
    block = SwinBlock(6, WindowAttention(6, 1, 7))
    block.attn = OrderSensitive()
    fn = OrderSensitive()
    x = torch.randn(2, *hw, 6, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = getattr(block, method)(x, window, shift, None)
    ref = reference(x_ref, window, shift, lambda win: fn(win, window, None))
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)


@pytest.mark.parametrize('hw,window,shift', [((203, 308), (7, 7), (3, 3)), ((56, 77), (7, 7), (3, 3)),
                                               ((24, 32), (8, 8), (4, 0)), ((12, 16), (4, 4), (0, 2)),
                                               ((7, 21), (7, 7), (3, 3)), ((14, 7), (7, 7), (3, 3))])
def test_shift_mask_is_the_official_region_mask(hw, window, shift):
    """The mask kept as its distinct windows and expanded is the official one: regions of the shifted layout
    labelled by slices, -100 between tokens of different regions."""
    regions = torch.zeros(1, *hw, 1)
    bands = [[slice(0, -win), slice(-win, -sh), slice(-sh, None)] if sh else [slice(None)]
             for win, sh in zip(window, shift)]
    label = 0
    for rows in bands[0]:
        for cols in bands[1]:
            regions[:, rows, cols, :] = label
            label += 1
    per_window = official_partition(regions, window).view(-1, window[0] * window[1])
    differ = per_window[:, None, :] - per_window[:, :, None]
    expected = torch.zeros(differ.shape).masked_fill(differ != 0, -100.0)
    assert torch.equal(shift_mask(hw, window, shift, torch.device('cpu')), expected)


def test_shift_mask_values():
    """-100 between tokens from different regions of the shifted layout, 0 within one."""
    mask = shift_mask((14, 14), (7, 7), (3, 3), torch.device('cpu'))
    assert mask.shape == (4, 49, 49)
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    assert (mask[0] == 0).all()  # the top-left window holds one region
    # the bottom-right window holds four regions of 4x4, 4x3, 3x4 and 3x3 tokens
    assert int((mask[3] == 0).sum()) == 16 ** 2 + 12 ** 2 + 12 ** 2 + 9 ** 2
    assert shift_mask((14, 14), (7, 7), (0, 0), torch.device('cpu')) is None


def test_relative_position_index_official_order():
    idx = relative_position_index((2, 2))
    # tokens (0,0),(0,1),(1,0),(1,1); offset (dh, dw) -> (dh + 1) * 3 + (dw + 1)
    assert idx.tolist() == [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]


@pytest.mark.parametrize('real,chunks,bounds', [
    ([49] * 8 + [7] * 4, 3, (0, 3, 6, 12)),  # shares of 140 and 280: nearest 147 and 294, after 3 and 6 windows
    ([49] * 8 + [7] * 4, 1, (0, 12)),
    ([3, 1, 1, 1], 4, (0, 1, 2, 3, 4)),  # one window each
    ([10, 1, 1, 1, 1], 2, (0, 1, 5)),
    ([1, 1, 1, 1, 10], 2, (0, 4, 5)),
    ([100, 1, 1, 1], 3, (0, 1, 2, 4)),  # the first share lands on window 0's end; each chunk keeps a window
])
def test_balanced_bounds(real, chunks, bounds):
    assert balanced_bounds(torch.tensor(real), chunks) == bounds


@pytest.mark.parametrize('hw,window,shift,per_chunk', [((50, 76), (7, 7), (3, 3), 22), ((100, 152), (7, 7), (0, 0), 83),
                                                       ((58, 57), (4, 4), (2, 2), 38), ((10, 13), (4, 4), (2, 2), 5)])
def test_balanced_window_chunks(hw, window, shift, per_chunk):
    """Balanced chunks: as many as chunks of ``per_chunk`` windows, the same positions in the same order, each
    chunk's padding, slots and rows those of its windows, and their real tokens within one window of an equal
    share (the last of the equal chunks holds the padded bottom row of windows)."""
    cpu, n = torch.device('cpu'), window[0] * window[1]
    equal = window_chunks(hw, window, shift, per_chunk, cpu)
    balanced = window_chunks(hw, window, shift, per_chunk, cpu, balance=True)
    assert len(balanced) == len(equal)
    for name in ('index', 'rows', 'real'):
        joined = [torch.cat([getattr(c, name) for c in chunks]) for chunks in (balanced, equal)]
        assert torch.equal(*joined)
    assert [(c.windows.start, c.windows.stop) for c in equal] == [
        (i * per_chunk, min((i + 1) * per_chunk, equal[-1].windows.stop)) for i in range(len(equal))]
    assert balanced[0].windows.start == 0 and balanced[-1].windows.stop == equal[-1].windows.stop
    for a, b in zip(balanced, balanced[1:]):
        assert a.windows.stop == b.windows.start
    for chunk in balanced:
        assert chunk.index.numel() == (chunk.windows.stop - chunk.windows.start) * n
        assert torch.equal(chunk.rows >= 0, chunk.slots >= 0)
        assert torch.equal(chunk.real, chunk.rows[chunk.rows >= 0])
        assert torch.equal(chunk.slots[chunk.slots >= 0], torch.arange(chunk.real.numel()))
        padding = torch.tensor([], dtype=torch.long) if chunk.padding is None else chunk.padding
        assert torch.equal(padding, (chunk.rows < 0).nonzero().view(-1))
    share = sum(c.real.numel() for c in equal) / len(equal)
    assert all(abs(c.real.numel() - share) <= n for c in balanced)
    assert max(abs(c.real.numel() - share) for c in equal) > n  # the equal chunks were not balanced
