"""CPU bf16 inference's products on AMX tiles: the weights' packing, the linear and the MLP half of a block on
tiles against fp32 references and oneDNN's bf16 products, the packed weights kept across forwards, and the
backbones' outputs with and without the tiles."""
import pytest
import torch
import torch.nn.functional as F

from mmswin.models import SwinTransformer, SwinTransformerV2, cpu_kernels
from mmswin.models.blocks import PatchEmbed, PatchMerging, PatchMergingV2

from .test_inference_shared_chunks import threads, with_spread_norms

needs_amx = pytest.mark.skipif(not (cpu_kernels.kernels_available() and cpu_kernels.kernels().amx_available()),
                               reason='the products on tiles need a CPU with AMX-BF16 (see test_cpu_kernels.py)')

pytestmark = needs_amx


def bf16(*shape, scale=1.0, seed=0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).bfloat16()


def onednn_linear(x, w, b):
    return torch.ops.mkldnn._linear_pointwise(x, w, b, 'none', [], '')


def test_packing_holds_each_pair_of_the_reduction_axis_at_its_tile_row_and_column():
    n, k = 64, 96
    w = bf16(n, k)
    packed = cpu_kernels.kernels().pack_tile_pairs(w)
    assert packed.shape == (n // 16, k // 32, 16, 16) and packed.dtype == torch.int32
    bits = w.view(torch.int16).to(torch.int64) & 0xFFFF
    # word (g, s, p, col) = w[g*16 + col, s*32 + 2p] | w[g*16 + col, s*32 + 2p + 1] << 16
    pairs = bits.view(n // 16, 16, k // 32, 16, 2)  # (g, col, s, p, half)
    expected = (pairs[..., 0] | (pairs[..., 1] << 16)).permute(0, 2, 3, 1)  # (g, s, p, col)
    assert torch.equal(packed.to(torch.int64) & 0xFFFFFFFF, expected)


@pytest.mark.parametrize('rows', [1, 31, 32, 33, 100, 3800])
@pytest.mark.parametrize('n,k', [(96, 32), (288, 96), (64, 384)])
@pytest.mark.parametrize('biased', [True, False])
def test_linear_on_tiles_is_within_bf16_rounding_of_fp32_and_as_close_as_onednn(rows, n, k, biased):
    x, w = bf16(rows, k), bf16(n, k, scale=k ** -0.5, seed=1)
    b = bf16(n, seed=2) if biased else None
    out = cpu_kernels.kernels().tile_linear(x, cpu_kernels.kernels().pack_tile_pairs(w), b)
    assert out.shape == (rows, n) and out.dtype == torch.bfloat16
    ref = x.float() @ w.float().t() + (b.float() if biased else 0)
    # fp32 sums of bf16 products rounded once to bf16: 2^-8 of the value, plus the sums' own rounding
    bound = 2 ** -8 * ref.abs() + 1e-5 * (x.float().abs() @ w.float().abs().t())
    assert ((out.float() - ref).abs() <= bound).all()
    plain = onednn_linear(x, w, b).float()
    assert (out.float() - ref).norm() <= 1.05 * (plain - ref).norm()


def mlp_inputs(c: int, tokens: int):
    h = 4 * c
    return dict(x=bf16(tokens, c, seed=3), w1=bf16(h, c, scale=c ** -0.5, seed=4), b1=bf16(h, scale=0.1, seed=5),
                w2=bf16(c, h, scale=h ** -0.5, seed=6), b2=bf16(c, scale=0.1, seed=7),
                norm_weight=torch.rand(c, generator=torch.Generator().manual_seed(8)) + 0.5,
                norm_bias=torch.randn(c, generator=torch.Generator().manual_seed(9)) * 0.1)


def fp32_mlp_half(a: dict, post_norm: bool) -> torch.Tensor:
    """The MLP half in fp32 from the bf16 inputs, the norm's output and the GELU's rounded to bf16 as the
    kernels round them (the products' inputs are bf16)."""
    x, c = a['x'].float(), a['x'].shape[1]
    norm = (a['norm_weight'], a['norm_bias'], 1e-5)
    inp = x if post_norm else F.layer_norm(x, (c,), *norm).bfloat16().float()
    hidden = F.gelu(inp @ a['w1'].float().t() + a['b1'].float()).bfloat16().float()
    branch = hidden @ a['w2'].float().t() + a['b2'].float()
    if post_norm:
        branch = F.layer_norm(branch.bfloat16().float(), (c,), *norm)
    return x + branch


@pytest.mark.parametrize('c,tokens', [(32, 45), (96, 3000), (192, 777), (384, 300), (768, 100)])
@pytest.mark.parametrize('post_norm', [False, True])
def test_mlp_half_on_tiles_is_as_close_to_fp32_as_onednns(c, tokens, post_norm):
    """x += fc2(gelu(fc1(norm(x)))) (V2: x += norm(fc2(gelu(fc1(x))))) on tiles against the fp32 computation
    and oneDNN's bf16 products (gelu_mlp_rows_): within a bf16 rounding of the residual sum and two of the
    branch and of its scale (its row's root mean square: the hidden values' roundings add up over the row, and
    V2's norm spreads a rounding of the branch over it) elementwise, and as close overall."""
    a = mlp_inputs(c, tokens)
    ops = cpu_kernels.kernels()
    args = (a['norm_weight'], a['norm_bias'], 1e-5, post_norm, 64)
    tiles = a['x'].clone()
    out = ops.gelu_mlp_rows_(tiles, ops.pack_tile_pairs(a['w1']), a['b1'], ops.pack_tile_pairs(a['w2']), a['b2'],
                             *args)
    assert out is tiles
    plain = a['x'].clone()
    ops.gelu_mlp_rows_(plain, a['w1'], a['b1'], a['w2'], a['b2'], *args)
    ref = fp32_mlp_half(a, post_norm)
    branch = ref - a['x'].float()
    scale = branch.pow(2).mean(1, keepdim=True).sqrt()
    assert ((tiles.float() - ref).abs() <= 2 ** -8 * ref.abs() + 2 ** -7 * (branch.abs() + scale) + 1e-3).all()
    error, plain_error = (tiles.float() - ref).norm(), (plain.float() - ref).norm()
    assert error <= 1.05 * plain_error
    assert error <= 4e-3 * ref.norm()


@pytest.mark.parametrize('post_norm', [False, True])
def test_mlp_half_on_tiles_is_the_same_for_any_chunks_and_threads(post_norm):
    """Each row's values depend on that row only: the same bits for any chunk size and thread count (the
    padded rows of a last block of fewer than 32 never reach the map)."""
    a = mlp_inputs(96, 1000)
    ops = cpu_kernels.kernels()
    packed = ops.pack_tile_pairs(a['w1']), ops.pack_tile_pairs(a['w2'])
    outs = []
    for n, chunk in ((1, 1000), (2, 37), (3, 250), (2, 1)):
        x = a['x'].clone()
        with threads(n):
            ops.gelu_mlp_rows_(x, packed[0], a['b1'], packed[1], a['b2'], a['norm_weight'], a['norm_bias'], 1e-5,
                                post_norm, chunk)
        outs.append(x)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    one = a['x'][17:18].clone()  # a single row alone
    ops.gelu_mlp_rows_(one, packed[0], a['b1'], packed[1], a['b2'], a['norm_weight'], a['norm_bias'], 1e-5,
                        post_norm, 1)
    assert torch.equal(one, outs[0][17:18])


def test_gelu_on_tiles_is_the_exact_gelu_to_bf16_rounding():
    """The kernels' GELU (Abramowitz and Stegun's 7.1.28) alone: a zero row without norm parameters normalises
    to zero, so fc1's output is its bias h; fc2 picks one of its columns into each output. Within 3e-7 |h| of
    the fp64 GELU before bf16's rounding, and that rounding the same as PyTorch's bf16 GELU's but for a few
    values next to a rounding boundary."""
    ops, c = cpu_kernels.kernels(), 32
    h = torch.linspace(-6, 6, 40 * 4 * c).bfloat16().view(40, 4 * c)
    w1 = ops.pack_tile_pairs(torch.zeros(4 * c, c, dtype=torch.bfloat16))
    picks = []
    for part in range(4):
        w2 = torch.zeros(c, 4 * c, dtype=torch.bfloat16)
        w2[torch.arange(c), part * c + torch.arange(c)] = 1
        picks.append(ops.pack_tile_pairs(w2))
    out = torch.empty(40, 4, c, dtype=torch.bfloat16)
    for i in range(40):
        for part in range(4):
            x = torch.zeros(1, c, dtype=torch.bfloat16)
            ops.gelu_mlp_rows_(x, w1, h[i], picks[part], None, None, None, 1e-5, False, 1)
            out[i, part] = x[0]
    out, h = out.view(-1).double(), h.view(-1).double()
    exact = F.gelu(h)
    assert ((out - exact).abs() <= 2 ** -8 * exact.abs() + 3e-7 * h.abs() + 1e-7).all()
    # Where |GELU| > 1e-4 (h > -4) PyTorch's bf16 GELU (7.1.26) rounds to the same bf16 in 97 % of the values
    # and ours to the correctly rounded one nearly as often; below, neither approximation is accurate to 2^-8
    # of GELU's tiny values (both are within 3e-7 |h| absolute).
    above = h > -4
    torch_gelu = F.gelu(h.bfloat16()).double()
    assert (out != torch_gelu)[above].double().mean() < 0.03
    rounded = exact.bfloat16().double()
    assert (out == rounded)[above].double().mean() >= (torch_gelu == rounded)[above].double().mean() - 0.01


@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
def test_backbone_on_tiles_is_as_close_to_fp32_as_without(cls, monkeypatch):
    """bf16 in-place inference with the projections and MLP halves on tiles (C = 32, 64, 128, 256) against the
    same model in fp32: as close as without tiles (MMSWIN_AMX=0), cosine similarity above 0.9995 per output."""
    torch.manual_seed(0)
    model = with_spread_norms(cls(embed_dims=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7,
                                  drop_path_rate=0.0)).eval()
    x = torch.randn(2, 3, 224, 320)
    with torch.no_grad():
        ref = model(x)
        monkeypatch.delenv('MMSWIN_AMX', raising=False)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            tiles = model(x)
        monkeypatch.setenv('MMSWIN_AMX', '0')
        with torch.autocast('cpu', dtype=torch.bfloat16):
            plain = model(x)
    for t, p, r in zip(tiles, plain, ref):
        assert t.dtype == torch.bfloat16 and t.shape == r.shape and not torch.equal(t, p)
        t, p = t.float(), p.float()
        assert F.cosine_similarity(t.flatten(), r.flatten(), dim=0) > 0.9995
        assert (t - r).norm() <= 1.1 * (p - r).norm()


def test_packed_weights_are_kept_until_the_weight_changes():
    w = torch.nn.Parameter(torch.randn(64, 32))
    first = cpu_kernels.tile_pairs(w)
    assert cpu_kernels.tile_pairs(w) is first
    ops = cpu_kernels.kernels()
    assert torch.equal(first, ops.pack_tile_pairs(w.detach().bfloat16()))
    with torch.no_grad():
        w.mul_(2)  # an optimizer step, load_state_dict: in place
    again = cpu_kernels.tile_pairs(w)
    assert again is not first and torch.equal(again, ops.pack_tile_pairs(w.detach().bfloat16()))
    w.data = torch.randn(64, 32)  # new storage
    assert torch.equal(cpu_kernels.tile_pairs(w), ops.pack_tile_pairs(w.detach().bfloat16()))


def test_a_model_made_in_inference_mode_takes_the_tiles():
    """Weights made under torch.inference_mode() have no version counter: packed at every call, the same
    outputs as the same weights made outside it."""
    torch.manual_seed(0)
    model = SwinTransformer(embed_dims=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0).eval()
    x = torch.randn(1, 3, 224, 256)
    with torch.inference_mode():
        made = SwinTransformer(embed_dims=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0).eval()
        made.load_state_dict(model.state_dict())
        assert made.layers[0].blocks[0].mlp.fc1.weight.is_inference()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            outs = made(x)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        expected = model(x)
    assert all(torch.equal(a, b) for a, b in zip(outs, expected))


@pytest.mark.parametrize('call,message', [
    (lambda ops: ops.pack_tile_pairs(torch.zeros(48, 32, dtype=torch.bfloat16)),
     r"pack_tile_pairs: weight's N and K must be multiples of 32, got \[48, 32\]"),
    (lambda ops: ops.pack_tile_pairs(torch.zeros(32, 32)),
     r'pack_tile_pairs: weight must be a contiguous \(N, K\) bf16'),
    (lambda ops: ops.tile_linear(torch.zeros(5, 48, dtype=torch.bfloat16),
                                 ops.pack_tile_pairs(torch.zeros(32, 64, dtype=torch.bfloat16)), None),
     r'tile_linear: x must be a contiguous \(rows, K\) bf16 CPU tensor with K a multiple of 32'),
    (lambda ops: ops.tile_linear(torch.zeros(5, 32, dtype=torch.bfloat16),
                                 ops.pack_tile_pairs(torch.zeros(32, 64, dtype=torch.bfloat16)), None),
     r'tile_linear: weight must be pack_tile_pairs\'s contiguous \(2, 1, 16, 16\) int32 CPU tensor for a \(32, 32\)'),
    (lambda ops: ops.tile_linear(torch.zeros(5, 32, dtype=torch.bfloat16),
                                 ops.pack_tile_pairs(torch.zeros(32, 32, dtype=torch.bfloat16)), torch.zeros(32)),
     r'tile_linear: bias must be None or a contiguous \(32,\) bf16'),
    (lambda ops: ops.gelu_mlp_rows_(torch.zeros(5, 32, dtype=torch.bfloat16),
                                     ops.pack_tile_pairs(torch.zeros(128, 32, dtype=torch.bfloat16)), None,
                                     ops.pack_tile_pairs(torch.zeros(64, 128, dtype=torch.bfloat16)), None,
                                     None, None, 1e-5, False, 8),
     r'gelu_mlp_rows_: w2 must be pack_tile_pairs\'s contiguous \(2, 4, 16, 16\) int32 CPU tensor for a \(32, 128\)'),
    (lambda ops: ops.gelu_mlp_rows_(torch.zeros(5, 32, dtype=torch.bfloat16),
                                     ops.pack_tile_pairs(torch.zeros(128, 32, dtype=torch.bfloat16)), None,
                                     ops.pack_tile_pairs(torch.zeros(32, 128, dtype=torch.bfloat16)), None,
                                     None, None, 1e-5, False, 0),
     'gelu_mlp_rows_: chunk must be positive, got 0'),
    (lambda ops: ops.patch_merging_tiles(torch.zeros(1, 4, 4, 24, dtype=torch.bfloat16),
                                         ops.pack_tile_pairs(torch.zeros(64, 128, dtype=torch.bfloat16)),
                                         None, None, 1e-5, False, 8),
     r'patch_merging_tiles: x must be a contiguous \(B, H, W, C\) bf16 CPU tensor with C a multiple of 16'),
    (lambda ops: ops.patch_merging_tiles(torch.zeros(1, 4, 4, 32, dtype=torch.bfloat16),
                                         ops.pack_tile_pairs(torch.zeros(64, 96, dtype=torch.bfloat16)),
                                         None, None, 1e-5, False, 8),
     r'patch_merging_tiles: weight must be pack_tile_pairs\'s contiguous \(4, 4, 16, 16\) int32 CPU tensor for '
     r'a \(64, 128\) weight'),
])
def test_bad_input_is_named(call, message):
    with pytest.raises(RuntimeError, match=message):
        call(cpu_kernels.kernels())


def with_and_without_tiles(module, on_tiles, x: torch.Tensor, monkeypatch) -> tuple:
    """``module(x)`` under bf16 autocast (as the backbones' bf16 inference runs it) on AMX tiles and without
    them (MMSWIN_AMX=0), checking with ``on_tiles(x)`` that each takes the path meant, as fp32."""
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        monkeypatch.delenv('MMSWIN_AMX', raising=False)
        assert on_tiles(x)
        tiles = module(x)
        monkeypatch.setenv('MMSWIN_AMX', '0')
        assert not on_tiles(x)
        plain = module(x)
    assert tiles.dtype == plain.dtype == torch.bfloat16 and tiles.shape == plain.shape
    return tiles.float(), plain.float()


def assert_as_close_as_without_tiles(tiles: torch.Tensor, plain: torch.Tensor, ref: torch.Tensor) -> None:
    """Within bf16 roundings of the path without tiles elementwise (of a value and of its row's root mean
    square), and as close to the fp32 reference overall."""
    scale = plain.abs() + plain.pow(2).mean(-1, keepdim=True).sqrt()
    assert ((tiles - plain).abs() <= 2 ** -7 * scale).all()
    error = (tiles - ref).norm()
    assert error <= 1.05 * (plain - ref).norm() and error <= 2 ** -7 * ref.norm()


@pytest.mark.parametrize('cls', [PatchMerging, PatchMergingV2])
@pytest.mark.parametrize('shape', [(1, 8, 8, 32), (2, 15, 9, 48), (1, 50, 76, 96)])
def test_patch_merging_on_tiles_is_as_close_to_fp32_as_without(cls, shape, monkeypatch):
    """V1 (norm, then reduction) and V2 (reduction, then norm) with odd sides (zero padding): the kernels'
    merging on tiles within bf16 roundings of the merging without tiles (MMSWIN_AMX=0) elementwise, and as
    close to the fp32 merging of the same bf16 map overall."""
    torch.manual_seed(0)
    merging = cls(shape[-1], norm_cfg=dict(type='LN')).eval()
    with torch.no_grad():
        merging.norm.weight.normal_(1.0, 0.1)
        merging.norm.bias.normal_(0.0, 0.1)
    x = torch.randn(shape).bfloat16()
    with torch.no_grad():
        ref = merging(x.float())
    tiles, plain = with_and_without_tiles(merging, merging.merges_on_tiles, x, monkeypatch)
    assert tiles.shape == (shape[0], -(-shape[1] // 2), -(-shape[2] // 2), 2 * shape[-1])
    assert_as_close_as_without_tiles(tiles, plain, ref)


@pytest.mark.parametrize('size', [(32, 32), (45, 61)])
@pytest.mark.parametrize('normed', [True, False])
@pytest.mark.parametrize('image_dtype', [torch.float32, torch.bfloat16])
def test_patch_embedding_on_tiles_is_within_bf16_rounding_of_the_convolution(size, normed, image_dtype,
                                                                            monkeypatch):
    """The patch embedding on tiles (each patch gathered, rounded to bf16, projected, normalised) against the
    bf16 convolution and norm without tiles (MMSWIN_AMX=0), sides not multiples of the patch (zero padding):
    within a bf16 rounding elementwise, as close to the fp32 embedding overall."""
    torch.manual_seed(0)
    embed = PatchEmbed(3, 64, 4, norm_cfg=dict(type='LN'), use_norm=normed).eval()
    if normed:
        with torch.no_grad():
            embed.norm.weight.normal_(1.0, 0.1)
            embed.norm.bias.normal_(0.0, 0.1)
    x = torch.randn(2, 3, *size).to(image_dtype)
    with torch.no_grad():
        ref = embed(x.bfloat16().float())
    tiles, plain = with_and_without_tiles(embed, embed.embeds_on_tiles, x, monkeypatch)
    assert tiles.shape == (2, -(-size[0] // 4), -(-size[1] // 4), 64)
    assert_as_close_as_without_tiles(tiles, plain, ref)
