"""CPU bf16 in-place inference's attention half of a block in one call of the kernels that shares chunks of
windows out among the threads (``window_attention_rows_``): the values of the chunk-by-chunk pass, bit for bit,
on any number of threads, inside the blocks too; bad input named before anything is written."""
import pytest
import torch

from mmswin.models import SwinTransformer, SwinTransformerV2, blocks, cpu_kernels
from mmswin.models.windows import shift_mask, window_chunks

pytestmark = pytest.mark.skipif(not cpu_kernels.kernels_available(),
                                reason='the compiled kernels need Linux on x86 with AVX512-BF16')

HW, WINDOW, SHIFT, C, HEADS = (10, 13), (4, 4), (2, 2), 32, 2  # 3 x 4 windows of 16 tokens, padded and shifted


def threads(n: int):
    class Threads:
        def __enter__(self):
            self.before = torch.get_num_threads()
            torch.set_num_threads(n)

        def __exit__(self, *exc):
            torch.set_num_threads(self.before)

    return Threads()


def attention_inputs(cosine: bool, qkv_bias: bool = True, proj_bias: bool = True, seed: int = 0) -> dict:
    """The map (2, H * W, C) and the kernel's arguments for chunks of three windows."""
    g = torch.Generator().manual_seed(seed)
    chunks = window_chunks(HW, WINDOW, SHIFT, 3, torch.device('cpu'))
    mask = shift_mask((12, 16), WINDOW, SHIFT, torch.device('cpu'))
    n = WINDOW[0] * WINDOW[1]

    def bf16(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).bfloat16()

    qkv_b = bf16(3 * C) if qkv_bias else None
    scale = torch.rand(HEADS, generator=g) * 10 + 1 if cosine else torch.full((HEADS,), (C // HEADS) ** -0.5)
    return dict(
        x=bf16(2, HW[0] * HW[1], C), rows=[c.real for c in chunks], slots=[c.slots for c in chunks],
        masks=[mask[3 * i:3 * (i + 1)].contiguous() for i in range(len(chunks))],
        norm_weight=torch.randn(C, generator=g), norm_bias=torch.randn(C, generator=g), eps=1e-5,
        post_norm=cosine, qkv_weight=bf16(3 * C, C, scale=C ** -0.5), qkv_bias=qkv_b,
        pad=qkv_b if qkv_bias else torch.zeros(3 * C, dtype=torch.bfloat16), heads=HEADS,
        bias=torch.randn(HEADS, n, n, generator=g), scale=scale, cosine=cosine,
        proj_weight=bf16(C, C, scale=C ** -0.5), proj_bias=bf16(C) if proj_bias else None)


def chunk_by_chunk(a: dict) -> torch.Tensor:
    """The attention half chunk after chunk in the row kernels, oneDNN's linear and the attention kernel, as
    the blocks run it without sharing (a new tensor)."""
    ops, x = cpu_kernels.kernels(), a['x'].clone()
    norm = (a['norm_weight'], a['norm_bias'], a['eps'])
    for k, (rows, slots) in enumerate(zip(a['rows'], a['slots'])):
        tokens = ops.gather_rows(x, rows, *norm, not a['post_norm'])
        b, r, c = tokens.shape
        qkv = torch.ops.mkldnn._linear_pointwise(tokens.view(-1, c), a['qkv_weight'], a['qkv_bias'], 'none', [], '')
        out = ops.window_attention_rows(qkv.view(b, r, 3 * c), slots, a['pad'], a['heads'], a['bias'],
                                        a['masks'][k] if a['masks'] else None, a['scale'], a['cosine'])
        branch = torch.ops.mkldnn._linear_pointwise(out.view(-1, c), a['proj_weight'], a['proj_bias'], 'none', [], '')
        ops.add_rows_(x, rows, branch.view(b, r, c), *norm, a['post_norm'])
    return x


@pytest.mark.parametrize('n', [1, 2, 3])
@pytest.mark.parametrize('cosine', [False, True])
@pytest.mark.parametrize('biases,masked', [(True, True), (False, False)])
def test_shared_chunks_give_the_chunk_by_chunk_values(n, cosine, biases, masked):
    """V1 (norm before, dot-product logits) and V2 (norm after, cosine logits), with and without the shift
    mask and the projections' biases: the map of the chunk-by-chunk pass, bit for bit."""
    a = attention_inputs(cosine, qkv_bias=biases, proj_bias=biases)
    if not masked:
        a['masks'] = []
    expected = chunk_by_chunk(a)
    x = a['x']
    before = x.clone()
    with threads(n):
        out = cpu_kernels.kernels().window_attention_rows_(**a)
    assert out is x
    assert not torch.equal(x, before)
    assert torch.equal(x, expected)


@pytest.mark.parametrize('change,message', [
    (dict(x=torch.zeros(2, 130, C)), r'x must be a contiguous \(B, L, C\) bf16'),
    (dict(norm_weight=torch.zeros(C, dtype=torch.bfloat16)), r'norm_weight must be None or a contiguous \(32,\) fp32'),
    (dict(eps=-1.0), 'eps must not be negative'),
    (dict(qkv_weight=torch.zeros(C, C, dtype=torch.bfloat16)), r'qkv_weight must be a contiguous \(96, 32\) bf16'),
    (dict(qkv_bias=torch.zeros(3 * C)), r'qkv_bias must be None or a contiguous \(96,\) bf16'),
    (dict(proj_weight=torch.zeros(C, 3 * C, dtype=torch.bfloat16)), r'proj_weight must be a contiguous \(32, 32\)'),
    (dict(proj_bias=torch.zeros(3 * C, dtype=torch.bfloat16)), r'proj_bias must be None or a contiguous \(32,\)'),
    ('one row list too few', 'rows and slots must hold one tensor per chunk, got 3 and 4'),
    ('one mask too few', r'masks must be empty or one per chunk \(4\), got 3'),
    ('int32 rows', r'rows\[1\] must be a contiguous \(R,\) int64'),
    ('a row beyond the map', r'rows\[3\]\[0\] = 130 is not a row of x\'s 130'),
    ('a row twice', r'rows name row \d+ of x twice \(again in chunk 3\)'),
    ('bad slots', r'slots\[0\] = 99 is neither -1 nor a row of qkv'),
    ('short pad', r'pad must be a contiguous \(3C,\) = \(96,\) bf16'),
])
def test_bad_input_is_named_and_nothing_is_written(change, message):
    a = attention_inputs(cosine=False)
    if isinstance(change, dict):
        a.update(change)
    elif change == 'one row list too few':
        a['rows'] = a['rows'][:3]
    elif change == 'one mask too few':
        a['masks'] = a['masks'][:3]
    elif change == 'int32 rows':
        a['rows'][1] = a['rows'][1].int()
    elif change == 'a row beyond the map':
        a['rows'][3] = a['rows'][3].clone()
        a['rows'][3][0] = 130
    elif change == 'a row twice':
        a['rows'][3] = a['rows'][3].clone()
        a['rows'][3][0] = a['rows'][0][0]
    elif change == 'bad slots':
        a['slots'][0] = a['slots'][0].clone()
        a['slots'][0][0] = 99
    elif change == 'short pad':
        a['pad'] = a['pad'][:C]
    x = a['x']
    before = x.clone()
    with pytest.raises(RuntimeError, match=f'window_attention_rows_: {message}'):
        cpu_kernels.kernels().window_attention_rows_(**a)
    assert torch.equal(x, before)


def with_spread_norms(model: torch.nn.Module) -> torch.nn.Module:
    """V2 starts with zero res-post-norm weights (each branch adds zero): give every norm weight a spread."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'norm' in name and name.endswith('weight'):
                p.normal_(1.0, 0.1)
    return model


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
@pytest.mark.parametrize('n', [1, 2, 3])
@pytest.mark.parametrize('tiles', [False, pytest.param(True, marks=pytest.mark.skipif(
    not (cpu_kernels.kernels_available() and cpu_kernels.kernels().amx_available()),
    reason='the projections on tiles need a CPU with AMX-BF16'))])
def test_blocks_share_window_chunks_with_the_values_of_the_chunk_by_chunk_pass(cls, n, tiles, monkeypatch):
    """In bf16 in-place inference, a block's attention half with at least two chunks of windows per thread is
    one call of the kernels, with the values of the blocks' chunk-by-chunk pass (the shift mask, padding, two
    images), bit for bit; with its projections on AMX tiles (C a multiple of 32), in chunks of 256 to 384 tokens
    instead of 1024 to CHUNK_TOKENS."""
    if not tiles:
        monkeypatch.setenv('MMSWIN_AMX', '0')
    torch.manual_seed(0)
    model = with_spread_norms(cls(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0,
                                  window_size=4)).eval()
    x = torch.randn(2, 3, 230, 226)  # the first stage's 2 x 58 x 57 tokens: 15 x 15 windows per image
    kernels, calls, real = cpu_kernels.kernels(), [], []

    class Recording:
        def __getattr__(self, name):
            return getattr(kernels, name)

        def window_attention_rows_(self, x, rows, *args):
            calls.append((tuple(x.shape), len(rows)))
            real.append([r.numel() for r in rows])
            return kernels.window_attention_rows_(x, rows, *args)

    monkeypatch.setattr(cpu_kernels, 'kernels', Recording)

    def run():
        with threads(n), torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
            return model(x)

    shared = run()
    monkeypatch.setattr(blocks.SwinBlock, 'attention_in_kernels_', lambda self, *args: False)
    one_by_one = run()
    # Two chunks per thread (their number a multiple of the thread count) of at least 32 windows (1024 tokens of
    # the two images): the first stage's 225 windows per image in 2, 4 or 6 chunks, the second stage's 64 in 2 (on
    # more threads too few), the third stage's 16 in one. On tiles (from the second stage on, C = 32) 8 to 12
    # windows (256 to 384 tokens): the second stage's in 6 chunks, the third stage's in 2 (on more threads too
    # few).
    first = [((2, 58 * 57, 16), 2 * n)] * 2
    if tiles:
        later = [((2, 29 * 29, 32), 6)] * 2 + {1: [((2, 15 * 15, 64), 2)] * 2, 2: [], 3: []}[n]
    else:
        later = {1: [((2, 29 * 29, 32), 2)] * 2, 2: [], 3: []}[n]
    assert calls == first + later
    # chunks of about the same number of real tokens (within a window's 16), not of windows: the last row and
    # column of windows hold padding
    assert all(max(sizes) - min(sizes) <= 2 * 16 for sizes in real)
    for a, b in zip(shared, one_by_one):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)
