"""CPU bf16 training's window attention with its qkv projection, whose forward and backward share the chunks of
windows out among the threads: the output and gradients of the chunk-by-chunk passes bit for bit, on any
number of threads, and their bad input named."""
import pytest
import torch

from mmswin.models import SwinTransformer, SwinTransformerV2, cpu_kernels, layers
from mmswin.models.windows import shift_mask

needs_kernels = pytest.mark.skipif(not cpu_kernels.kernels_available(),
                                   reason='the compiled kernels need Linux on x86 with AVX512-BF16')


def attention_gradients(block, stage, x: torch.Tensor, grad: torch.Tensor) -> list:
    """The output, and the gradients of ``x`` and of the attention's parameters, of the shifted-window
    attention branch of ``block`` under bf16 autocast."""
    h, w = x.shape[1:3]
    window, shift = stage.window_layout(h, w)
    padded = (-(-h // window[0]) * window[0], -(-w // window[1]) * window[1])
    mask = shift_mask(padded, window, shift, x.device)
    x = x.clone().requires_grad_()
    block.zero_grad(set_to_none=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = block.window_attention(x, window, shift, mask)
    out.backward(grad)
    return [out.detach(), x.grad] + [p.grad for p in block.attn.parameters() if p.grad is not None]


@needs_kernels
@pytest.mark.parametrize('cls', [SwinTransformer, SwinTransformerV2])
def test_threads_sharing_the_chunks_give_the_chunk_by_chunk_gradients(cls, monkeypatch):
    """Two images of 15x18 tokens in windows of 4x4 (padded, shifted), in chunks of 4 windows: 10 chunks,
    shared out among 1, 2 and 3 threads in one call of the kernels for the forward and one for the
    backward, give the output and the gradients of the input, the
    qkv projection, the position bias (V2: its MLP) and V2's logit scales that the chunk-by-chunk pass gives,
    bit for bit."""
    monkeypatch.setattr(layers, 'CHUNK_TOKENS', 64)
    torch.manual_seed(0)
    model = cls(embed_dims=32, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 8), window_size=4, drop_path_rate=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    stage = model.layers[0]
    block = stage.blocks[1]
    x = torch.randn(2, 15, 18, 32).bfloat16()
    grad = torch.randn(2, 15, 18, 32).bfloat16()
    kernels, calls = cpu_kernels.kernels(), []

    class Recording:
        def __getattr__(self, name):
            return getattr(kernels, name)

        def projected_rows_attention_forward(self, *args):
            out, qkv, lse = kernels.projected_rows_attention_forward(*args)
            forward_calls.append(len(qkv))
            return out, qkv, lse

        def projected_rows_attention_backward(self, grad, x, weight, qkv, *args):
            calls.append(len(qkv))
            return kernels.projected_rows_attention_backward(grad, x, weight, qkv, *args)

    forward_calls = []

    monkeypatch.setattr(cpu_kernels, 'kernels', Recording)
    with monkeypatch.context() as m:
        m.setattr(cpu_kernels, 'threads_share', lambda chunks: False)
        expected = attention_gradients(block, stage, x, grad)
    assert not calls and not forward_calls
    assert len(expected) == (7 if cls is SwinTransformer else 11)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            shared = attention_gradients(block, stage, x, grad)
            assert calls.pop() == 10 and forward_calls.pop() == 10
            assert all(torch.equal(a, b) for a, b in zip(shared, expected)), n
    finally:
        torch.set_num_threads(threads)


def backward_inputs() -> dict:
    """Inputs of one image of 10 rows in one chunk, C = 16, one head, with the shapes the checks accept."""
    bf16 = dict(dtype=torch.bfloat16)
    return dict(grad=torch.zeros(1, 10, 16, **bf16), x=torch.zeros(1, 10, 16, **bf16),
                weight=torch.zeros(48, 16, **bf16), qkv=[torch.zeros(1, 10, 48, **bf16)],
                lse=[torch.zeros(1, 10, 1)], starts=[0, 10], slots=[torch.arange(16) % 11 - 1], masks=[],
                pad=torch.zeros(48, **bf16), heads=1, bias=torch.zeros(1, 16, 16), scale=torch.ones(1),
                cosine=False, need_x=True, need_weight=True, need_pad=True, need_bias=True, need_scale=False)


@needs_kernels
@pytest.mark.parametrize('arg,value,message', [
    ('x', torch.zeros(1, 10, 16), r'x must be a contiguous \(B, L, C\) bf16'),
    ('grad', torch.zeros(1, 9, 16, dtype=torch.bfloat16), "grad must be a contiguous bf16 CPU tensor of x's shape"),
    ('weight', torch.zeros(16, 16, dtype=torch.bfloat16), r'weight must be a contiguous \(3C, C\) = \(48, 16\)'),
    ('starts', [0, 9], "starts must hold the first row of each of the 1 chunks and then x's 10 rows"),
    ('masks', [torch.zeros(1, 16, 16)] * 2, r'masks must be empty or one per chunk \(1\), got 2'),
    ('qkv', [], r'qkv and lse must hold one tensor per image and chunk \(1\), got 0 and 1'),
])
def test_bad_backward_input_is_named(arg, value, message):
    inputs = backward_inputs()
    inputs[arg] = value
    with pytest.raises(RuntimeError, match=f'projected_rows_attention_backward: {message}'):
        cpu_kernels.kernels().projected_rows_attention_backward(**inputs)


@needs_kernels
@pytest.mark.parametrize('arg,value,message', [
    ('x', torch.zeros(1, 10, 16), r'x must be a contiguous \(B, L, C\) bf16'),
    ('weight', torch.zeros(48, 8, dtype=torch.bfloat16), r'weight must be a contiguous \(3C, C\) = \(48, 16\)'),
    ('qkv_bias', torch.zeros(16, dtype=torch.bfloat16), r'qkv_bias must be None or a contiguous \(48,\) bf16'),
    ('starts', [0, 11], "starts must hold the first row of each of the 1 chunks and then x's 10 rows"),
])
def test_bad_forward_input_is_named(arg, value, message):
    names = ('x', 'weight', 'starts', 'slots', 'masks', 'pad', 'heads', 'bias', 'scale', 'cosine')
    inputs = {name: backward_inputs()[name] for name in names}
    inputs.update(qkv_bias=torch.zeros(48, dtype=torch.bfloat16), fused_bias=False)
    inputs[arg] = value
    with pytest.raises(RuntimeError, match=f'projected_rows_attention_forward: {message}'):
        cpu_kernels.kernels().projected_rows_attention_forward(**inputs)


@needs_kernels
def test_decreasing_starts_are_named():
    inputs = backward_inputs()
    inputs.update(starts=[0, 6, 4, 10], slots=inputs['slots'] * 3, qkv=inputs['qkv'] * 3, lse=inputs['lse'] * 3)
    with pytest.raises(RuntimeError, match='starts must not decrease, got 6 then 4'):
        cpu_kernels.kernels().projected_rows_attention_backward(**inputs)
