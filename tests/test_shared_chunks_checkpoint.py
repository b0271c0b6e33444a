"""The passes that share chunks out among the threads (CPU bf16 training) under ``with_cp=True``:
torch.utils.checkpoint's saved-tensor hooks are Python objects in the state each thread takes on, which must
not deadlock them. Run in a child process with a time limit, so that a deadlock fails the test instead of
hanging the session."""
import subprocess
import sys
import textwrap

import pytest

from mmswin.models import cpu_kernels

TIMEOUT_S = 300
SCRIPT = textwrap.dedent('''
    import torch
    from mmswin.models import SwinTransformer, SwinTransformerV2, cpu_kernels, layers

    torch.set_num_threads(2)
    layers.CHUNK_TOKENS = 64                 # attention chunks of 4 windows of 4x4
    layers.MLP_CHUNK_ELEMENTS = 16 * 128     # MLP chunks of 16 tokens at the first stage
    kernels, calls = cpu_kernels.kernels(), []

    class Recording:
        def __getattr__(self, name):
            if name in ('norm_gelu_mlp_forward', 'norm_gelu_mlp_backward', 'projected_rows_attention_backward'):
                calls.append(name)
            return getattr(kernels, name)

    cpu_kernels.kernels = Recording
    x = torch.randn(2, 3, 60, 72, generator=torch.Generator().manual_seed(1))
    for cls in (SwinTransformer, SwinTransformerV2):
        results = []
        for with_cp in (False, True):
            torch.manual_seed(0)
            model = cls(embed_dims=32, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 8), window_size=4,
                        drop_path_rate=0.0, with_cp=with_cp).train()
            with torch.no_grad():  # V2's post-norms start at zero: blocks whose outputs and gradients are seen
                for name, p in model.named_parameters():
                    if 'norm' in name and name.endswith('weight'):
                        p.normal_(1.0, 0.1)
            calls.clear()
            with torch.autocast('cpu', dtype=torch.bfloat16):
                outs = model(x)
            sum(o.float().square().sum() for o in outs).backward()
            results.append(([o.detach() for o in outs], [p.grad for p in model.parameters()]))
            assert {'norm_gelu_mlp_forward', 'norm_gelu_mlp_backward', 'projected_rows_attention_backward'} <= set(
                calls)
        (outs, grads), (outs_cp, grads_cp) = results
        assert all(torch.equal(a, b) for a, b in zip(outs, outs_cp)), cls.__name__
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads, grads_cp)), cls.__name__
    print('ok')
''')


@pytest.mark.skipif(not cpu_kernels.kernels_available(),
                    reason='the compiled kernels need Linux on x86 with AVX512-BF16')
def test_shared_chunk_passes_under_checkpointing_on_two_threads():
    """Both backbones with and without ``with_cp`` on two threads, small chunks so that the MLP half's forward
    and backward and the attention's backward share them out: no deadlock, and with checkpointing the
    outputs and parameter gradients of the run without it, bit for bit."""
    try:
        done = subprocess.run([sys.executable, '-c', SCRIPT], capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f'the passes that share chunks out among the threads did not finish in {TIMEOUT_S} s under '
                    'torch.utils.checkpoint (a deadlock)')
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith('ok')
