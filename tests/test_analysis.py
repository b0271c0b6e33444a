"""FLOP counting agrees with the Swin papers' tables; the get_flops tool reports them."""
import json
import mmap
import os
import statistics
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from mmswin.analysis import backbone_flops
from mmswin.models import SwinTransformer, SwinTransformerV2, cpu_kernels
from mmswin.models.gelu_mlp import gelu_mlp

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('cls,arch,size,paper_gflops', [
    (SwinTransformer, 'tiny', 224, 4.5),  # Swin paper, Table 1
    (SwinTransformer, 'small', 224, 8.7),
    (SwinTransformerV2, 'tiny', 256, 5.9),  # SwinV2 model zoo, window 8
])
def test_backbone_flops_match_published(cls, arch, size, paper_gflops):
    kwargs = dict(window_size=8) if cls is SwinTransformerV2 else {}
    gflops = backbone_flops(cls(arch=arch, **kwargs), size, size) / 1e9
    assert gflops == pytest.approx(paper_gflops, abs=0.1)


def test_get_flops_tool_on_a_config():
    cfg = ROOT / 'configs/swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'
    out = subprocess.run([sys.executable, str(ROOT / 'tools/analysis/get_flops.py'), str(cfg), '--json',
                          '--shape', '256', '256'], capture_output=True, text=True, check=True, cwd=ROOT)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result['input_shape'] == [1, 3, 256, 256]
    assert result['params'] == pytest.approx(59.9e6, rel=0.01)  # UperNet Swin-T: 60M in the paper
    # the official table gives 945G at 512x2048; FLOPs scale with the area (16x smaller here)
    assert result['flops'] / 1e9 == pytest.approx(945 / 16, rel=0.05)


def test_benchmark_tool_on_a_tiny_size(tmp_path):
    out = tmp_path / 'report.json'
    subprocess.run([sys.executable, str(ROOT / 'tools/analysis/benchmark.py'), '--sizes', '1x3x64x64',
                    '--models', 'mmswin-v1', 'mmswin-v2', 'mmdet-v1', '--precisions', 'fp32', '--repeats', '2',
                    '--memory-models', 'mmswin-v1', '--profile', '--processes', '2',
                    '--warmup', '1', '--out', str(out)], capture_output=True, text=True, check=True, cwd=ROOT)
    report = json.loads(out.read_text())
    rows = {(r['model'], r['mode']): r for r in report['results']}
    assert set(rows) == {(m, mode) for m in ('mmswin-v1', 'mmswin-v2', 'mmdet-v1') for mode in ('inference', 'train')}
    for (model, mode), row in rows.items():
        assert len(row['times_s']) == 2 and row['median_s'] > 0 and 0 < row['fraction_of_matmul'] < 1.5
        if model != 'mmdet-v1':
            assert row['speedup_vs_mmdet-v1'] > 0
    assert rows[('mmswin-v2', 'train')]['slowdown_vs_mmswin-v1'] > 0
    assert report['matmul_flops_per_s']['fp32'] > 1e9
    assert report['code'] == load_benchmark_tool().code_identity()  # the checkout's commit, where it is one
    assert report['shares_use_start_rate'] is True
    for row in rows.values():  # the rate around each group; the shares use the highest of those and the start's
        before, after = row['matmul_flops_per_s_before']['fp32'], row['matmul_flops_per_s_after']['fp32']
        start = report['matmul_flops_per_s']['fp32']
        assert row['matmul_flops_per_s'] == {'fp32': max(before, after, start)} and min(before, after) > 1e9
        assert row['fraction_of_matmul'] == pytest.approx(row['flops_per_s'] / max(before, after, start))
    if os.path.exists('/proc/cpuinfo'):  # the CPU's part, which its name alone does not tell
        assert report['cpu_id'] == load_benchmark_tool().cpu_identity(Path('/proc/cpuinfo').read_text())
        assert {'vendor', 'family', 'model'} <= set(report['cpu_id'])
    # mmswin-v1 with mmdet's weights gives mmdet's outputs
    (agreement,) = report['max_abs_diff_vs_mmdet']
    assert len(agreement['max_abs_diff']) == 4 and max(agreement['max_abs_diff']) < 1e-4
    memory = {(m['model'], m['with_cp']): m for m in report['train_peak_memory_bytes']}
    assert set(memory) == {('mmswin-v1', False), ('mmswin-v1', True)}
    assert {m['precision'] for m in memory.values()} == {'fp32'}  # the run's precisions
    for m in memory.values():
        # at least the gradients of Swin-T's 28.3M fp32 parameters are live at the peak
        assert m['tensor_bytes'] >= 28e6 * 4
        assert m['rss_bytes'] >= 0
        # without the allocator's pool the resident set holds what is live (and a little more)
        assert 0.9 * m['tensor_bytes'] <= m['rss_bytes_unpooled'] <= 1.5 * m['tensor_bytes'] + 64 * 2 ** 20

    table = subprocess.run([sys.executable, str(ROOT / 'tools/analysis/benchmark_table.py'), str(out)],
                           capture_output=True, text=True, check=True, cwd=ROOT).stdout
    # every turn of a model starts with an untimed call (the tool's default), and no branch is dropped; the two
    # rounds ran in two successive processes of each model
    assert report['settle_calls'] == 1 and report['calls_per_turn'] == 1 and report['drop_path_rate'] == 0.0
    assert report['processes'] == 2
    assert (f"2 timed repeats per model, each turn after 1 untimed call, the rounds shared out among 2 successive "
            f"processes of each model{load_benchmark_tool('benchmark_table').cpu_text(report)}; dense matmul") in table
    assert load_benchmark_tool('benchmark_table').rate_lines(report)[0] in table.splitlines()
    if report['code']['commit']:
        assert f"; code at {load_benchmark_tool('benchmark_table').code_text(report)}\n" in table
    lines = [line for line in table.splitlines() if line.startswith('| 1x3x64x64 | fp32 |')]
    headroom_rows = [line for line in lines if ' G | ' in line]
    assert len([line for line in lines if line.count(' | ') == 9]) == 6  # speed: 3 models x 2 modes
    # the ratio to mmdet of each round: mmdet's time over the model's, both from that round
    for (model, mode), row in rows.items():
        if model != 'mmdet-v1':
            mmdet_times = rows[('mmdet-v1', mode)]['times_s']
            assert row['round_speedups_vs_mmdet-v1'] == [p / t for p, t in zip(mmdet_times, row['times_s'])]
    round_rows = [line.strip('| ').split(' | ') for line in lines if line.count(' | ') == 6 and line.endswith('x |')]
    assert len(round_rows) == 4  # mmswin-v1 and v2 x 2 modes
    for cells in round_rows:
        rounds = rows[(cells[3], cells[2])]['round_speedups_vs_mmdet-v1']
        assert cells[4:] == [f'{statistics.median(rounds):.2f}x', f'{min(rounds):.2f}x', f'{max(rounds):.2f}x']
    # page faults and system time per call, medians of the timed calls
    for row in rows.values():
        assert row['page_faults'] >= 0 and row['system_s'] >= 0
    kernel_rows = [line for line in lines if line.count(' | ') == 6 and line.endswith(' ms |')
                   and ' G | ' not in line]
    assert len(kernel_rows) == 6
    for line in kernel_rows:
        cells = line.strip('| ').split(' | ')
        assert cells[5] == f"{rows[(cells[3], cells[2])]['page_faults']:.0f}"
    # headroom per mode: the time at the dense matmul rate and the largest possible speedup over mmdet
    assert [line.split(' | ')[2] for line in headroom_rows] == ['inference', 'train']
    for line in headroom_rows:
        cells = line.strip('| ').split(' | ')
        # mmdet at the dense matmul rate would be 1 / (its share of that rate) times faster
        assert cells[6] == f"{1 / rows[('mmdet-v1', cells[2])]['fraction_of_matmul']:.2f}x"
    # every model's products replayed alone, and the speedup over mmdet that they alone would allow
    products = {(p['model'], p['mode']): p for p in report['products_alone']}
    assert set(products) == set(rows)
    for p in products.values():
        assert p['calls'] >= p['distinct'] > 0 and p['alone_s'] > 0 and p['profiled_s'] > 0
        assert 0 < p['profiled_caller_s'] <= p['profiled_s']
    product_rows = [line.strip('| ').split(' | ') for line in lines if line.count(' ms | ') == 3]
    assert len(product_rows) == 6
    for cells in product_rows:
        alone = products[(cells[3], cells[2])]['alone_s']
        assert cells[7] == f"{rows[('mmdet-v1', cells[2])]['median_s'] / alone:.2f}x"
    memory_rows = [line for line in table.splitlines() if line.startswith('| 1x3x64x64 | fp32 | mmswin-v1 | ')]
    assert len(memory_rows) == 2 and memory_rows[0].count('MiB') == 3
    # operators per call, forward and backward: a training step runs more than a forward
    operators = {(p['model'], p['mode']): p['operators'] for p in report['profiles']}
    assert set(operators) == set(rows)
    for model in ('mmswin-v1', 'mmswin-v2', 'mmdet-v1'):
        assert 0 < operators[(model, 'inference')] < operators[(model, 'train')]
    profiles = {(p['model'], p['mode']): p for p in report['profiles']}
    for p in profiles.values():
        # the calling thread's own times add up to no more than the call, and rank the operators
        assert 0 < p['caller_ms'] <= p['step_ms'] and p['other_threads_ms'] >= 0
        assert [o['caller_ms'] for o in p['ops']] == sorted((o['caller_ms'] for o in p['ops']), reverse=True)
        for o in p['ops']:
            assert o['caller_ms'] <= o['self_ms'] and o['share'] == o['caller_ms'] / p['step_ms']
    profile_rows = [line.strip('| ').split(' | ') for line in lines if line.count(' | ') == 7 and '%' in line]
    assert sorted((cells[3], cells[2], int(cells[4])) for cells in profile_rows) == sorted(
        (model, mode, count) for (model, mode), count in operators.items())
    for cells in profile_rows:
        p = profiles[(cells[3], cells[2])]
        assert cells[5:7] == [f"{p['step_ms']:.0f} ms", f"{p['other_threads_ms']:.0f} ms"]
    # with_cp against without, per column
    assert memory_rows[1].count('less)') + memory_rows[1].count('more)') == 3



def test_benchmark_tool_times_compiled_models(tmp_path):
    """--compile adds each model compiled (inductor, frozen weights in inference) to its group, timed with
    the others, with the cosine of its outputs to the eager model's."""
    out = tmp_path / 'report.json'
    subprocess.run([sys.executable, str(ROOT / 'tools/analysis/benchmark.py'), '--sizes', '1x3x64x64',
                    '--models', 'mmswin-v1', '--precisions', 'fp32', '--modes', 'inference', '--repeats', '2',
                    '--no-memory', '--compile', '--out', str(out)], capture_output=True, text=True, check=True,
                   cwd=ROOT)
    report = json.loads(out.read_text())
    rows = {r['model']: r for r in report['results']}
    assert set(rows) == {'mmswin-v1', 'mmswin-v1+compile'}
    assert len(rows['mmswin-v1+compile']['times_s']) == 2 and rows['mmswin-v1+compile']['median_s'] > 0
    # the same FLOPs for the compiled model: its FLOP/s scale with the inverse of its time
    ratio = rows['mmswin-v1']['median_s'] / rows['mmswin-v1+compile']['median_s']
    assert rows['mmswin-v1+compile']['flops_per_s'] == pytest.approx(rows['mmswin-v1']['flops_per_s'] * ratio)
    (agreement,) = report['compiled_cosine_to_eager']
    assert agreement['model'] == 'mmswin-v1+compile' and len(agreement['cosine']) == 4
    assert min(agreement['cosine']) > 0.99999
    table = subprocess.run([sys.executable, str(ROOT / 'tools/analysis/benchmark_table.py'), str(out)],
                           capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert '| 1x3x64x64 | fp32 | mmswin-v1+compile | 1.00000, 1.00000, 1.00000, 1.00000 |' in table


def test_benchmark_tool_plots_throughput_per_precision(tmp_path):
    """--plot times inference at every --plot-sizes side in every precision and draws one line per model and
    precision; the report keeps the images per second behind the plot."""
    out, plot = tmp_path / 'report.json', tmp_path / 'plot.png'
    subprocess.run([sys.executable, str(ROOT / 'tools/analysis/benchmark.py'), '--sizes', '1x3x32x32',
                    '--models', 'mmswin-v1', '--precisions', 'fp32', 'bf16', '--modes', 'inference',
                    '--repeats', '1', '--warmup', '0', '--no-memory', '--plot', str(plot), '--plot-sizes', '32', '48',
                    '--calls-per-turn', '2', '--settle-calls', '0', '--drop-path-rate', '0.2', '--out', str(out)],
                   capture_output=True, text=True, check=True, cwd=ROOT)
    report = json.loads(out.read_text())
    # one round of two calls in a row per model, all timed
    assert report['calls_per_turn'] == 2 and report['settle_calls'] == 0 and report['drop_path_rate'] == 0.2
    assert all(len(row['times_s']) == 2 for row in report['results'])
    tables = load_benchmark_tool('benchmark_table')
    expected = (f'1 round of 2 timed calls in a row per model; training steps with stochastic depth up to 0.2 '
                f'(their shares of the matmul rate and dense-rate bounds count every branch, the dropped ones too)'
                f'{tables.cpu_text(report)}; dense matmul')
    assert expected in tables.main([str(out)])
    sweep = report['throughput_sweep']
    assert set(sweep) == {'fp32', 'bf16'}
    for per_model in sweep.values():
        assert set(per_model) == {'mmswin-v1'}
        for points in per_model.values():
            assert set(points) == {'32', '48'} and all(v > 0 for v in points.values())
    assert plot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_benchmark_tool_compares_low_precision_outputs_and_gradients_with_fp32(tmp_path):
    """In a lower precision every model's outputs (inference) and parameter gradients (training) are compared
    with its own fp32 ones, per output and per parameter, and the table lists them."""
    out = tmp_path / 'report.json'
    subprocess.run([sys.executable, str(ROOT / 'tools/analysis/benchmark.py'), '--sizes', '1x3x64x64',
                    '--models', 'mmswin-v1', 'mmdet-v1', '--precisions', 'bf16', '--repeats', '1', '--warmup', '0',
                    '--no-memory', '--drop-path-rate', '0.2', '--out', str(out)],
                   capture_output=True, text=True, check=True, cwd=ROOT)
    report = json.loads(out.read_text())
    outputs = {c['model']: c for c in report['cosine_to_fp32']}
    assert set(outputs) == {'mmswin-v1', 'mmdet-v1'}
    for c in outputs.values():
        assert c['size'] == [1, 3, 64, 64] and c['precision'] == 'bf16'
        assert len(c['cosine']) == 4 and all(0.999 < v <= 1 + 1e-12 for v in c['cosine'])
    rows = {g['model']: g for g in report['gradient_cosine_to_fp32']}
    assert set(rows) == {'mmswin-v1', 'mmdet-v1'}
    for g in rows.values():
        # every one of Swin-T's 177 parameters has a gradient (no branch is dropped in the check)
        assert g['size'] == [1, 3, 64, 64] and g['precision'] == 'bf16' and g['parameters'] == 177
        assert 0.9 < g['worst'] <= g['median'] <= 1 and 0 <= g['below_0_999'] <= g['parameters']
    table = load_benchmark_tool('benchmark_table').main([str(out)])
    cosines = ', '.join(f'{v:.5f}' for v in outputs['mmdet-v1']['cosine'])
    assert f'| 1x3x64x64 | bf16 | mmdet-v1 | {cosines} |' in table
    g = rows['mmswin-v1']
    assert (f"| 1x3x64x64 | bf16 | mmswin-v1 | 177 | {g['worst']:.5f} (`{g['worst_parameter']}`) | "
            f"{g['median']:.5f} | {g['below_0_999']} |") in table


def test_gradient_agreement_counts_the_parameters_with_fp32_gradients():
    """Parameters without a gradient, or with a zero one, are left out; in fp32 against fp32 every cosine is 1."""
    benchmark = load_benchmark_tool()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.norm = torch.nn.Linear(6, 6), torch.nn.LayerNorm(6)
            self.unused, self.dead = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(6))

        def forward(self, x):
            return [self.norm(self.proj(x)) + 0 * self.dead]

    torch.manual_seed(0)
    net = Net()
    agreement = benchmark.gradient_cosine_to_fp32(net, torch.randn(4, 6), 'fp32')
    assert agreement['parameters'] == 4 and agreement['below_0_999'] == 0
    assert agreement['worst'] == pytest.approx(1.0, abs=1e-12) and agreement['median'] == pytest.approx(1.0, abs=1e-12)
    assert all(p.grad is None for p in net.parameters())  # the model is left without gradients


def test_norm_weights_are_redrawn_around_one():
    from mmswin.models import SwinTransformerV2
    benchmark = load_benchmark_tool()
    torch.manual_seed(0)
    model = SwinTransformerV2(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4)
    post_norm = model.layers[0].blocks[0].norm1.weight
    assert not post_norm.any()  # V2's post-norms start at zero (official initialisation)
    before = {name: p.clone() for name, p in model.named_parameters()}
    benchmark.redraw_norm_weights(model)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    norms = {f'{name}.weight' for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert changed == norms
    values = torch.cat([dict(model.named_parameters())[name].flatten() for name in norms])
    assert (values - 1).abs().max() < 0.6 and 0.05 < (values - 1).std() < 0.15


@pytest.mark.skipif(not cpu_kernels.kernels_available(), reason="needs mmswin's CPU kernels (AVX512-BF16)")
@pytest.mark.parametrize('name', ['mmswin-v1', 'mmswin-v2'])
def test_bf16_training_gradients_of_the_kernels_stay_close_to_fp32(name):
    """Swin-T's parameter gradients under CPU bf16 autocast, through the kernels, against fp32, per parameter at
    1x3x224x320: 0.999 or closer. PyTorch's own bf16 operators (``MMSWIN_BF16_MATMUL=native``, or mmdet's Swin)
    give the layer norms' weight and bias gradients cosines down to 0.975 here (and 0.87 at 800x1216); the
    kernels sum those in fp32. The exception is V2's logit scales, a few sums each over every attention logit of
    a block, which bf16 logits take to about 0.996 with PyTorch's operators as well as with the kernels."""
    benchmark = load_benchmark_tool()
    torch.manual_seed(0)
    model = benchmark.build_model(name, 7)
    benchmark.redraw_norm_weights(model)
    model.train()
    x = torch.randn(1, 3, 224, 320, generator=torch.Generator().manual_seed(1))
    cosines = benchmark.gradient_cosines_to_fp32(model, x, 'bf16')
    assert cosines.keys() == dict(model.named_parameters()).keys()
    logit_scales = {k: v for k, v in cosines.items() if k.endswith('.attn.logit_scale')}
    assert len(logit_scales) == (12 if name == 'mmswin-v2' else 0)
    others = {k: v for k, v in cosines.items() if k not in logit_scales}
    assert min(others.values()) >= 0.999, sorted(others.items(), key=lambda kv: kv[1])[:5]
    assert all(v >= 0.99 for v in logit_scales.values()), logit_scales


def test_compile_needs_a_warmup_round():
    result = subprocess.run([sys.executable, str(ROOT / 'tools/analysis/benchmark.py'), '--compile',
                             '--warmup', '0'], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and '--compile needs --warmup of at least 1' in result.stderr


def test_bad_turn_and_rate_arguments_are_named():
    for flag, value, message in (('--calls-per-turn', '0', 'at least 1, got 0'),
                                 ('--settle-calls', '-1', 'at least 0, got -1'),
                                 ('--drop-path-rate', '1', r'in [0, 1), got 1.0')):
        result = subprocess.run([sys.executable, str(ROOT / 'tools/analysis/benchmark.py'), flag, value],
                                capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 2 and f'{flag} must be {message}' in result.stderr


def load_benchmark_tool(name: str = 'benchmark'):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, ROOT / f'tools/analysis/{name}.py')
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    return benchmark


def test_round_ratios_of_reports_without_them():
    # reports written before the tool recorded the rounds' ratios: they come from the times, in round order
    table = load_benchmark_tool('benchmark_table')
    group = dict(size=[1, 3, 64, 64], precision='bf16', mode='train')
    report = dict(results=[dict(group, model='mmswin-v1', times_s=[1.0, 2.0, 1.0]),
                           dict(group, model='mmdet-v1', times_s=[2.0, 3.0, 4.0])])
    assert table.round_table([report])[2:] == ['| 1x3x64x64 | bf16 | train | mmswin-v1 | 2.00x | 1.50x | 4.00x |']


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu avx512_bf16

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
"""


def test_reports_name_the_cpu_part():
    # the first processor's vendor, family, model and stepping, from Linux's /proc/cpuinfo
    identity = load_benchmark_tool().cpu_identity(CPUINFO)
    assert identity == dict(vendor='AuthenticAMD', family=25, model=17, stepping=1)
    assert load_benchmark_tool().cpu_identity('') == {}
    table = load_benchmark_tool('benchmark_table')
    assert table.cpu_text(dict(cpu='AMD EPYC', cpu_id=identity)) == (
        ', on AMD EPYC (AuthenticAMD family 25 model 17 stepping 1)')
    # reports written before the part was recorded, and reports of a GPU
    assert table.cpu_text(dict(cpu='AMD EPYC')) == ', on AMD EPYC'
    assert table.cpu_text(dict(device='cuda')) == ''


def test_shares_use_the_higher_matmul_rate_around_a_group(monkeypatch):
    """The dense matmul is measured right before a group's timing and right after it; the shares of the
    matmul rate use the higher of the two (a slow moment before the group would overstate them)."""
    benchmark = load_benchmark_tool()
    phase = ['before']
    measured = {'before': {'fp32': 2e9, 'bf16': 5e9}, 'after': {'fp32': 3e9, 'bf16': 4e9}}

    def timing(names, *args):
        phase[0] = 'after'
        return dict(times={name: [1.0] for name in names}, page_faults={}, system_s={})

    monkeypatch.setattr(benchmark, 'matmul_rate', lambda device, precision: measured[phase[0]][precision])
    monkeypatch.setattr(benchmark, 'time_in_workers', timing)
    group = benchmark.measure_group(['mmswin-v1'], 7, [1, 3, 32, 32], 'bf16', 'train', 'cpu', 1, 0, False)
    assert group['matmul_flops_per_s_before'] == measured['before']
    assert group['matmul_flops_per_s_after'] == measured['after']
    assert group['matmul_flops_per_s'] == {'fp32': 3e9, 'bf16': 5e9}
    rows = [dict(matmul_flops_per_s=group['matmul_flops_per_s'], matmul_flops_per_s_before=measured['before'],
                 matmul_flops_per_s_after=measured['after']),
            dict(matmul_flops_per_s={'fp32': 1e9, 'bf16': 6e9}, matmul_flops_per_s_before={'fp32': 1e9, 'bf16': 6e9},
                 matmul_flops_per_s_after={'fp32': 0.5e9, 'bf16': 1e9})]
    assert load_benchmark_tool('benchmark_table').rate_lines(dict(results=rows)) == [
        '- measured again right before each group: bf16 5.0-6.0, fp32 1.0-2.0 GFLOP/s; right after it: '
        'bf16 1.0-4.0, fp32 0.5-3.0 GFLOP/s; the shares use the higher of each group\'s two: bf16 5.0-6.0, '
        'fp32 1.0-3.0 GFLOP/s']
    # since reports say so, the run's start rate is among those the shares take the highest of
    assert load_benchmark_tool('benchmark_table').rate_lines(dict(results=rows, shares_use_start_rate=True))[0] == (
        '- measured again right before each group: bf16 5.0-6.0, fp32 1.0-2.0 GFLOP/s; right after it: '
        'bf16 1.0-4.0, fp32 0.5-3.0 GFLOP/s; the shares use the highest of each group\'s two and the start\'s: '
        'bf16 5.0-6.0, fp32 1.0-3.0 GFLOP/s')
    # reports written before the rate was measured after the groups too
    old = [dict(matmul_flops_per_s={'fp32': 1e9})]
    assert load_benchmark_tool('benchmark_table').rate_lines(dict(results=old)) == [
        '- measured again before each group (the rates the shares use): fp32 1.0-1.0 GFLOP/s']


@pytest.mark.parametrize('precision,mode,check', [('fp32', 'inference', 'max_abs_diff'),
                                                    ('bf16', 'inference', 'cosine_to_fp32'),
                                                    ('bf16', 'train', 'gradient_cosine_to_fp32')])
def test_checks_against_fp32_run_without_tf32(precision, mode, check, monkeypatch):
    """A group's comparisons with fp32 (mmswin against mmdet, low precisions against fp32) run with TF32 off
    for matrix products and cuDNN's convolutions, which cuDNN takes by default on CUDA; the settings are
    restored afterwards."""
    benchmark = load_benchmark_tool()
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    monkeypatch.setattr(benchmark, 'matmul_rate', lambda device, precision: 1e9)
    monkeypatch.setattr(benchmark, 'time_in_workers', lambda names, *args: dict(
        times={name: [1.0] for name in names}, page_faults={}, system_s={}))
    seen = []

    def settings():
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))

    if check == 'max_abs_diff':
        outputs = benchmark._outputs
        monkeypatch.setattr(benchmark, '_outputs', lambda model, x: settings() or outputs(model, x))
    else:
        monkeypatch.setattr(benchmark, check, lambda *args: settings() or [1.0])
    names = ['mmswin-v1', 'mmdet-v1'] if check == 'max_abs_diff' else ['mmswin-v1']
    try:
        group = benchmark.measure_group(names, 7, [1, 3, 32, 32], precision, mode, 'cpu', 1, 0, False)
        restored = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert seen and set(seen) == {(False, False)}
    assert {'max_abs_diff': 'max_abs_diff', 'cosine_to_fp32': 'cosine',
            'gradient_cosine_to_fp32': 'gradient_cosine'}[check] in group
    assert restored == (True, True)


def test_timing_counts_page_faults_per_call():
    """The page faults of a timed call: writing 64 MiB of freshly mapped anonymous memory faults in its
    pages, at least one per 2 MiB even with transparent huge pages."""
    benchmark = load_benchmark_tool()

    def fresh() -> None:
        torch.frombuffer(mmap.mmap(-1, 2 ** 26), dtype=torch.uint8).fill_(1)

    cpu = torch.device('cpu')
    calls = [benchmark.timed_call(fresh, cpu) for _ in range(3)]
    idle = [benchmark.timed_call(lambda: None, cpu) for _ in range(3)]
    assert all(seconds > 0 and system_s >= 0 for seconds, _, system_s in calls + idle)
    fresh_faults = [faults for _, faults, _ in calls]
    assert min(fresh_faults) >= 32 and max(faults for _, faults, _ in idle) < min(fresh_faults)


def test_every_model_is_timed_in_a_process_of_its_own(monkeypatch):
    """Each model is built and called in its own worker process, in turn, for warm-up plus repeats."""
    monkeypatch.syspath_prepend(str(ROOT / 'tools/analysis'))
    import benchmark
    timing = benchmark.time_in_workers(['mmswin-v1', 'mmdet-v1'], 7, [1, 3, 32, 32], 'fp32', 'train', 'cpu',
                                       repeats=3, warmup=1)
    pids = timing['pids']
    assert {name: len(p) for name, p in pids.items()} == {'mmswin-v1': 1, 'mmdet-v1': 1}
    assert len({p for ps in pids.values() for p in ps} | {os.getpid()}) == 3
    for key in ('times', 'page_faults', 'system_s'):
        assert {name: len(values) for name, values in timing[key].items()} == {'mmswin-v1': 3, 'mmdet-v1': 3}
    # turns of several calls in a row, the first untimed: the timed ones in round order
    timing = benchmark.time_in_workers(['mmswin-v1', 'mmdet-v1'], 7, [1, 3, 32, 32], 'fp32', 'inference', 'cpu',
                                       repeats=2, warmup=1, calls_per_turn=3, settle_calls=1)
    assert {name: len(values) for name, values in timing['times'].items()} == {'mmswin-v1': 6, 'mmdet-v1': 6}
    assert list(benchmark.call_order(['a', 'b'], 2)) == [(0, 'a', True), (0, 'b', True), (1, 'a', True),
                                                         (1, 'b', True)]
    assert list(benchmark.call_order(['a', 'b'], 2, 2, 1)) == [
        (r, n, timed) for r in (0, 1) for n in 'ab' for timed in (False, True, True)]
    with pytest.raises(RuntimeError, match="(?s)benchmark worker of resnet failed:.*unknown model 'resnet'"):
        benchmark.time_in_workers(['resnet'], 7, [1, 3, 32, 32], 'fp32', 'train', 'cpu', repeats=1, warmup=0)


def test_rounds_can_be_shared_out_among_fresh_processes(monkeypatch):
    """With processes above 1, each model's rounds run in that many successive worker processes of it, each
    warmed up on its own, the rounds shared out as evenly as they go and every round timed once."""
    monkeypatch.syspath_prepend(str(ROOT / 'tools/analysis'))
    import benchmark
    assert benchmark.rounds_of(5, 1) == [5] and benchmark.rounds_of(5, 2) == [3, 2]
    assert benchmark.rounds_of(7, 3) == [3, 2, 2] and benchmark.rounds_of(2, 2) == [1, 1]
    timing = benchmark.time_in_workers(['mmswin-v1', 'mmdet-v1'], 7, [1, 3, 32, 32], 'fp32', 'inference', 'cpu',
                                       repeats=3, warmup=1, processes=2)
    pids = timing['pids']
    assert {name: len(set(p)) for name, p in pids.items()} == {'mmswin-v1': 2, 'mmdet-v1': 2}
    assert len({p for ps in pids.values() for p in ps} | {os.getpid()}) == 5
    for key in ('times', 'page_faults', 'system_s'):
        assert {name: len(values) for name, values in timing[key].items()} == {'mmswin-v1': 3, 'mmdet-v1': 3}
    for processes in (0, 4):
        with pytest.raises(ValueError, match=f'processes must be from 1 to repeats \\(3\\), got {processes}'):
            benchmark.time_in_workers(['mmswin-v1'], 7, [1, 3, 32, 32], 'fp32', 'inference', 'cpu', repeats=3,
                                      warmup=0, processes=processes)


def test_training_step_starts_from_fixed_output_gradients():
    """The timed training step backpropagates fixed gradients of the outputs (their shapes and dtypes),
    the same in every call, with the outputs already released (as after a neck's backward), and leaves no
    parameter gradient behind."""
    benchmark = load_benchmark_tool()

    seen = []

    class TwoOutputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(6, 4), torch.nn.Linear(6, 3)

        def forward(self, x):
            out = self.a(x)
            alive = weakref.ref(out)
            # the gradient that reaches this output, and whether the output was still alive then
            out.register_hook(lambda grad: seen.append((grad, alive() is not None)))
            return out, self.b(x).float()

    model = TwoOutputs()
    step = benchmark.step_fn(model, torch.randn(5, 6), 'train', 'bf16')
    for _ in range(2):
        step()
        assert all(p.grad is None for p in model.parameters())
    (first, first_alive), (second, second_alive) = seen
    assert first.shape == (5, 4) and first.dtype == torch.bfloat16  # the linear's output under bf16 autocast
    assert torch.equal(first, second) and first.std() > 0.5
    assert not first_alive and not second_alive


def test_products_replayed_with_the_recorded_operands():
    """The replay finds every matrix product of a step with its operator, shapes, strides and dtypes."""
    benchmark = load_benchmark_tool()
    a, b = torch.randn(6, 5), torch.randn(4, 5)
    x, y = torch.randn(3, 6, 2, dtype=torch.bfloat16), torch.randn(3, 2, 7, dtype=torch.bfloat16)
    bias = torch.randn(4)

    def step() -> None:
        for _ in range(2):
            a @ b.t()
        torch.bmm(x, y)
        torch.nn.functional.linear(a, b, bias)

    calls = benchmark.product_calls(step)
    assert {(op, operands): e['count'] for (op, operands), e in calls.items()} == {
        ('aten::mm', (((6, 5), (5, 1), 'float'), ((5, 4), (1, 5), 'float'))): 2,
        ('aten::bmm', (((3, 6, 2), (12, 2, 1), 'c10::BFloat16'), ((3, 2, 7), (14, 7, 1), 'c10::BFloat16'))): 1,
        ('aten::addmm', (((4,), (1,), 'float'), ((6, 5), (5, 1), 'float'), ((5, 4), (1, 5), 'float'))): 1,
    }
    result = benchmark.products_alone(step, torch.device('cpu'), repeats=2)
    assert result['calls'] == 4 and result['distinct'] == 3 and result['alone_s'] > 0


@pytest.mark.skipif(not cpu_kernels.kernels_available(),
                    reason='the passes that share chunks out among the threads are those of the compiled kernels')
def test_profiles_tell_the_calling_thread_from_threads_that_run_shared_chunks():
    """A pass that gives each thread whole chunks records the products of the other thread's chunks on that
    thread: the profiles count them over all threads, and apart on the thread that called the step."""
    benchmark = load_benchmark_tool()
    fc1, fc2 = torch.nn.Linear(32, 128), torch.nn.Linear(128, 32)
    x = torch.randn(512, 32)

    def step() -> None:
        with torch.autocast('cpu', dtype=torch.bfloat16):
            gelu_mlp(x, fc1, fc2, chunk_elements=64 * 128)  # 8 chunks of 64 tokens, shared out

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        profile = benchmark.op_profile(step, top=100)
        calls = benchmark.product_calls(step)
    finally:
        torch.set_num_threads(threads)
    assert sum(e['count'] for e in calls.values()) == 16  # two products per chunk
    caller_s = sum(e['profiled_caller_s'] for e in calls.values())
    assert 0 < caller_s < sum(e['profiled_s'] for e in calls.values())
    products = [o for o in profile['ops'] if o['op'] in benchmark.PRODUCT_OPS]
    assert products and all(o['caller_ms'] <= o['self_ms'] for o in products)
    assert sum(o['self_ms'] - o['caller_ms'] for o in products) > 0
    assert profile['other_threads_ms'] > 0 and profile['caller_ms'] <= profile['step_ms']


def test_memory_is_measured_after_a_small_step_on_every_device(monkeypatch):
    """Before the measured step, the model takes one small training step (the batch of the measured size,
    64x64 images) on the device asked for, so that what libraries allocate once is not counted."""
    benchmark = load_benchmark_tool()
    steps = []
    step_fn = benchmark.step_fn

    def recorded(model, x, mode, precision):
        steps.append((tuple(x.shape), x.device.type, mode, precision, model.training))
        return step_fn(model, x, mode, precision)

    monkeypatch.setattr(benchmark, 'step_fn', recorded)
    model = benchmark.started_model('mmswin-v1', 7, [2, 3, 96, 128], 'fp32', True, torch.device('cpu'))
    assert steps == [((2, 3, 64, 64), 'cpu', 'train', 'fp32', True)]
    assert model.training and all(stage.with_cp for stage in model.layers)
    assert all(p.grad is None for p in model.parameters())  # the step leaves no gradients behind


def test_training_memory_is_measured_in_each_precision(tmp_path, monkeypatch):
    """Every model's training memory is measured in each precision of the run, with and without
    checkpointing, and recorded with its precision; the run's allocator settings are recorded (timing and
    measuring replaced by stand-ins here)."""
    benchmark = load_benchmark_tool()
    measured = []

    def memory(name, window, size, precision, device, with_cp=False):
        measured.append((precision, name, with_cp))
        return dict(tensor_bytes=2 ** 20 * (2 if precision == 'fp32' else 1) * (1 if with_cp else 3))

    def group(names, *args):
        rates = {'fp32': 1e9, 'bf16': 1e9}
        return dict(times={name: [1.0] for name in names}, matmul_flops_per_s=rates,
                    matmul_flops_per_s_before=rates, matmul_flops_per_s_after=rates)

    monkeypatch.setattr(benchmark, 'peak_train_memory', memory)
    monkeypatch.setattr(benchmark, 'measure_group_in_worker', group)
    monkeypatch.setattr(benchmark, 'matmul_rate', lambda device, precision: 1e9)
    for key in [k for k in os.environ if k.startswith('MALLOC_')]:
        monkeypatch.delenv(key)
    monkeypatch.setenv('THP_MEM_ALLOC_ENABLE', '1')
    monkeypatch.setenv('MALLOC_TRIM_THRESHOLD_', '131072')
    out = tmp_path / 'report.json'
    benchmark.main(['--sizes', '1x3x32x32', '--models', 'mmswin-v1', 'mmdet-v1', '--precisions', 'fp32', 'bf16',
                    '--modes', 'inference', '--repeats', '1', '--out', str(out)])
    runs = [(p, m, cp) for p in ('fp32', 'bf16') for m in ('mmswin-v1', 'mmdet-v1') for cp in (False, True)]
    assert measured == runs
    # the allocator settings of the run (they change the page faults) are recorded
    malloc_env = {'THP_MEM_ALLOC_ENABLE': '1', 'MALLOC_TRIM_THRESHOLD_': '131072'}
    assert json.loads(out.read_text())['malloc_env'] == malloc_env
    recorded = json.loads(out.read_text())['train_peak_memory_bytes']
    assert [(m['precision'], m['model'], m['with_cp']) for m in recorded] == runs
    table = load_benchmark_tool('benchmark_table').memory_table([json.loads(out.read_text())])
    assert table[2:4] == ['| 1x3x32x32 | fp32 | mmswin-v1 | False | 6 MiB |  |  |',
                          '| 1x3x32x32 | fp32 | mmswin-v1 | True | 2 MiB (67% less) |  |  |']
    assert table[6:8] == ['| 1x3x32x32 | bf16 | mmswin-v1 | False | 3 MiB |  |  |',
                          '| 1x3x32x32 | bf16 | mmswin-v1 | True | 1 MiB (67% less) |  |  |']
    # reports from before the precision was recorded: their memory was measured in fp32
    for m in recorded:
        del m['precision']
    assert load_benchmark_tool('benchmark_table').memory_table([dict(train_peak_memory_bytes=recorded[:2])])[2:] == [
        '| 1x3x32x32 | fp32 | mmswin-v1 | False | 6 MiB |  |  |',
        '| 1x3x32x32 | fp32 | mmswin-v1 | True | 2 MiB (67% less) |  |  |']
    # several reports: every report's rows, each with_cp row against its own report's
    doubled = [dict(m, tensor_bytes=2 * m['tensor_bytes']) for m in recorded[2:4]]
    assert load_benchmark_tool('benchmark_table').memory_table([dict(train_peak_memory_bytes=recorded[2:4]),
                                                                 dict(train_peak_memory_bytes=doubled)])[2:] == [
        '| 1x3x32x32 | fp32 | mmdet-v1 | False | 6 MiB |  |  |',
        '| 1x3x32x32 | fp32 | mmdet-v1 | True | 2 MiB (67% less) |  |  |',
        '| 1x3x32x32 | fp32 | mmdet-v1 | False | 12 MiB |  |  |',
        '| 1x3x32x32 | fp32 | mmdet-v1 | True | 4 MiB (67% less) |  |  |']


def test_operator_count_leaves_out_views_and_allocations():
    benchmark = load_benchmark_tool()
    x = torch.randn(4, 6, requires_grad=True)

    def step():
        x.grad = None
        torch.empty(4, 6)  # an allocation: no kernel
        y = x.view(24).mul(2).view(4, 6).t()  # views around one operator
        y.add(1).sum().backward()

    # forward: mul, add, sum; backward: the ones of the loss's gradient and the mul of mul's gradient
    # (sum's expand, the views' gradients and the detach of the new x.grad are views)
    assert benchmark.operator_count(step) == 5


def test_models_are_built_with_the_stochastic_depth_asked_for():
    """--drop-path-rate reaches every model: its last block drops its branches at that rate."""
    benchmark = load_benchmark_tool()
    for name in ('mmswin-v1', 'mmswin-v2', 'mmdet-v1'):
        for rate in (0.0, 0.2):
            model = benchmark.build_model(name, 7, drop_path_rate=rate)
            rates = [getattr(m, 'p', getattr(m, 'drop_prob', None)) for m in model.modules()
                     if type(m).__name__ == 'DropPath']
            assert len(rates) >= 12 and max(rates) == pytest.approx(rate), name


def _get_flops_usage_error(capsys, argv: list) -> str:
    """The message of get_flops' argument error (exit status 2) for ``argv``."""
    with pytest.raises(SystemExit) as exit_info:
        load_benchmark_tool('get_flops').parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_get_flops_applies_cfg_options_to_a_config(capsys):
    """--cfg-options override config entries, as in mmdet's and mmseg's get_flops; with a backbone name they
    are an argument error."""
    get_flops = load_benchmark_tool('get_flops')
    cfg = str(ROOT / 'configs/demo/mask-rcnn_swin-demo_fpn_demo-shapes-128.py')
    base = [cfg, '--backbone-only', '--shape', '32', '--json']
    full = get_flops.main(base)
    shallow = get_flops.main(base + ['--cfg-options', 'model.backbone.depths=1,1,1,1'])
    assert 0 < shallow['params'] < full['params'] and 0 < shallow['flops'] < full['flops']
    from mmengine.config import Config

    from mmswin.registry import MODELS
    backbone = Config.fromfile(cfg).model.backbone  # the backbone alone, built here: what --backbone-only counts
    for result, depths in ((full, None), (shallow, (1, 1, 1, 1))):
        model = MODELS.build(dict(backbone, **({} if depths is None else dict(depths=depths))))
        assert result['flops'] == backbone_flops(model, 32, 32)
        assert result['params'] == sum(p.numel() for p in model.parameters())
    capsys.readouterr()
    assert ('--cfg-options applies to a config file, not to the backbone name SwinTransformer'
            in _get_flops_usage_error(capsys, ['SwinTransformer', '--cfg-options', 'a=1']))


def test_get_flops_takes_one_or_two_shape_values(capsys):
    """One --shape value is a square input (as in mmseg's get_flops), two are H W; more are an error."""
    get_flops = load_benchmark_tool('get_flops')
    assert get_flops.parse_args(['SwinTransformer', '--shape', '32']).shape == (32, 32)
    assert get_flops.parse_args(['SwinTransformer', '--shape', '32', '48']).shape == (32, 48)
    # before the target too, as with two values before one was allowed
    args = get_flops.parse_args(['--shape', '32', '48', 'SwinTransformer'])
    assert (args.target, args.shape) == ('SwinTransformer', (32, 48))
    assert get_flops.main(['SwinTransformer', '--shape', '32', '--json'])['input_shape'] == [1, 3, 32, 32]
    capsys.readouterr()
    assert ('--shape takes one or two values (H W), got 32 32 32'
            in _get_flops_usage_error(capsys, ['SwinTransformer', '--shape', '32', '32', '32']))
    for bad in ('0', 'x'):
        assert '--shape takes positive integers' in _get_flops_usage_error(capsys, ['SwinTransformer', '--shape', bad])
    assert 'required: TARGET' in _get_flops_usage_error(capsys, ['--shape', '32', '48'])


def test_get_flops_names_the_backbones_for_an_unknown_target(capsys):
    """A target that is neither a backbone name nor a file: the error lists the backbone names, says a config
    file path is the other choice, and suggests the nearest name."""
    message = _get_flops_usage_error(capsys, ['SwinTransformerV3'])
    assert "'SwinTransformerV3'" in message and 'SwinTransformer, SwinTransformerV2' in message
    assert 'config file' in message and 'did you mean SwinTransformerV2?' in message
    assert 'did you mean' not in _get_flops_usage_error(capsys, ['configs/no_such_config.py'])


def test_get_flops_rejects_backbone_options_with_a_config(capsys):
    """--arch and --window-size build a backbone from its name; with a config they are an argument error
    (rather than ignored) that points to --cfg-options."""
    cfg = str(ROOT / 'configs/demo/mask-rcnn_swin-demo_fpn_demo-shapes-128.py')
    message = _get_flops_usage_error(capsys, [cfg, '--arch', 'small'])
    assert '--arch applies to a backbone name only' in message and '--cfg-options' in message
    assert '--window-size applies' in _get_flops_usage_error(capsys, [cfg, '--window-size', '8'])
    both = _get_flops_usage_error(capsys, [cfg, '--arch', 's', '--window-size', '8'])
    assert '--arch and --window-size apply' in both
    args = load_benchmark_tool('get_flops').parse_args(['SwinTransformerV2', '--window-size', '8'])
    assert (args.arch, args.window_size) == ('tiny', 8)
    assert "--arch must be one of base, large, small, tiny, b, l, s, t, got 'huge'" in _get_flops_usage_error(
        capsys, ['SwinTransformer', '--arch', 'huge'])


def _benchmark_usage_error(capsys, argv: list) -> str:
    """The message of benchmark.py's argument error (exit status 2) for ``argv``."""
    with pytest.raises(SystemExit) as exit_info:
        load_benchmark_tool().parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_benchmark_rejects_unknown_and_unimportable_models(capsys, monkeypatch):
    """--models and --memory-models take the names build_model knows, each once, whose package imports here; the
    error names the flag, and the known names or the package that does not import."""
    benchmark = load_benchmark_tool()
    known = ' '.join(benchmark.MODEL_PACKAGES)
    for flag in ('--models', '--memory-models'):
        message = _benchmark_usage_error(capsys, [flag, 'mmswin-v1', 'foo'])
        assert f"{flag}: unknown model 'foo'; choose from {known}" in message
        assert f'{flag}: mmswin-v2 given more than once' in _benchmark_usage_error(
            capsys, [flag, 'mmswin-v2', 'mmswin-v1', 'mmswin-v2'])
    # a package that imports while the module its Swin is built from does not (mmcv without its ops)
    monkeypatch.setitem(sys.modules, 'mmdet.models.backbones.swin', None)
    message = _benchmark_usage_error(capsys, ['--models', 'mmswin-v1', 'mmdet-v1'])
    assert '--models: mmdet-v1 needs the package mmdet (mmdet.models.backbones.swin), which does not import' in message
    assert 'mmdet-v1' not in message.split('models that can run here:')[1]
    assert 'mmdet-v1' not in benchmark.available_models()
    monkeypatch.delitem(sys.modules, 'mmdet.models.backbones.swin')
    monkeypatch.setitem(sys.modules, 'timm', None)  # a known peer that does not import
    message = _benchmark_usage_error(capsys, ['--memory-models', 'timm-v2'])
    assert '--memory-models: timm-v2 needs the package timm (timm), which does not import here' in message
    assert 'models that can run here: mmswin-v1 mmswin-v2' in message
    args = benchmark.parse_args(['--models', 'mmswin-v1', 'mmswin-v2', '--memory-models', 'mmswin-v2'])
    assert (args.models, args.memory_models) == (['mmswin-v1', 'mmswin-v2'], ['mmswin-v2'])
    assert set(benchmark.available_models()) <= set(benchmark.MODEL_PACKAGES)
    with pytest.raises(ValueError, match='unknown model'):
        benchmark.build_model('foo', 7)


def test_benchmark_rejects_counts_and_sizes_it_cannot_run(capsys):
    """Repeats, warm-up rounds, calls, windows and sizes that cannot give a timing are argument errors naming
    the flag and the values it takes."""
    for argv, message in ((['--repeats', '0'], '--repeats must be at least 1, got 0'),
                          (['--warmup', '-1'], '--warmup must be at least 0, got -1'),
                          (['--calls-per-turn', '0'], '--calls-per-turn must be at least 1, got 0'),
                          (['--settle-calls', '-2'], '--settle-calls must be at least 0, got -2'),
                          (['--processes', '0'], '--processes must be from 1 to --repeats (5), got 0'),
                          (['--repeats', '2', '--processes', '3'],
                           '--processes must be from 1 to --repeats (2), got 3'),
                          (['--window', '0'], '--window must be at least 1, got 0'),
                          (['--plot-sizes', '224', '-8'], '--plot-sizes must be positive, got 224 -8'),
                          (['--sizes', '1x3x0x64'], "argument --sizes: size must be BxCxHxW of positive integers"),
                          (['--sizes', '1x3xax64'], "argument --sizes: size must be BxCxHxW of positive integers, "
                                                    "got '1x3xax64'"),
                          (['--sizes', '1x3x64x64.5'], "argument --sizes: size must be BxCxHxW of positive integers"),
                          (['--sizes', '1x4x64x64'], "argument --sizes: size must have 3 channels (RGB images), "
                                                     "got '1x4x64x64'")):
        assert message in _benchmark_usage_error(capsys, argv)
    args = load_benchmark_tool().parse_args(['--repeats', '1', '--warmup', '0', '--settle-calls', '0'])
    assert (args.repeats, args.warmup, args.settle_calls, args.processes) == (1, 0, 0, 1)


def test_benchmark_table_names_files_that_are_not_reports(tmp_path, capsys):
    """A report that is not JSON, not an object or lacks a key that the tables read is an argument error (exit
    status 2, no traceback) that names the file and what is wrong."""
    table = load_benchmark_tool('benchmark_table')
    good = json.loads((ROOT / 'docs/reports/benchmark.json').read_text())
    assert table.load_report(str(ROOT / 'docs/reports/benchmark.json')) == good
    row = dict(good['results'][0])
    del row['median_s']
    not_report = 'is not a benchmark report (tools/analysis/benchmark.py):'
    cases = {'text.json': ('not json', 'is not JSON: Expecting value'),
             'empty.json': ('{}', f"{not_report} missing keys 'device', 'threads'"),
             'list.json': ('[]', f'{not_report} an array, not an object'),
             'no_results.json': (json.dumps({k: v for k, v in good.items() if k != 'results'}),
                                 f"{not_report} missing key 'results'"),
             'row.json': (json.dumps(dict(good, results=[good['results'][0], row])),
                          f"{not_report} results[1] misses key 'median_s'")}
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(SystemExit) as exit_info:
            table.main([str(ROOT / 'docs/reports/benchmark.json'), str(path)])
        assert exit_info.value.code == 2
        assert f'error: report {path} {message}' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        table.main([str(tmp_path / 'missing.json')])
    assert f'cannot read report {tmp_path / "missing.json"}: No such file or directory' in capsys.readouterr().err
    result = subprocess.run([sys.executable, str(ROOT / 'tools/analysis/benchmark_table.py'),
                             str(tmp_path / 'empty.json')], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and 'Traceback' not in result.stderr and 'empty.json' in result.stderr


def test_reports_name_the_code_they_measured(tmp_path):
    """A report records mmswin's version and, in a git checkout, the commit and whether tracked files differ
    from it; the tables show the short commit."""
    from mmswin.version import __version__
    benchmark, table = load_benchmark_tool(), load_benchmark_tool('benchmark_table')
    assert benchmark.code_identity(str(tmp_path)) == dict(mmswin=__version__, commit=None)  # not a checkout
    repo = tmp_path / 'repo'
    git = ['git', '-C', str(repo), '-c', 'user.name=a', '-c', 'user.email=a@b']
    subprocess.run(['git', 'init', '-q', str(repo)], check=True)
    (repo / 'f.py').write_text('a = 1\n')
    subprocess.run(git + ['add', 'f.py'], check=True)
    subprocess.run(git + ['commit', '-q', '-m', 'f'], check=True)
    head = subprocess.run(git + ['rev-parse', 'HEAD'], capture_output=True, text=True, check=True).stdout.strip()
    assert benchmark.code_identity(str(repo)) == dict(mmswin=__version__, commit=head, modified=False)
    (repo / 'new.py').write_text('')  # untracked files are not the measured code
    assert benchmark.code_identity(str(repo))['modified'] is False
    (repo / 'f.py').write_text('a = 2\n')
    code = benchmark.code_identity(str(repo))
    assert code['modified'] is True
    assert table.code_text(dict(code=code)) == head[:7] + '+changes'
    assert table.code_text(dict(code=dict(code, modified=False))) == head[:7]
    assert table.code_text(dict(code=dict(mmswin=__version__, commit=None))) == ''
    assert table.code_text({}) == ''  # reports written before the tool recorded it


def _run_report(code: dict, times: dict, mode: str = 'inference', **top) -> dict:
    results = [dict(size=[1, 3, 64, 64], precision='bf16', mode=mode, model=model, median_s=statistics.median(t),
                    times_s=t) for model, t in times.items()]
    return dict(threads=2, code=code, results=results, **top)


def test_runs_table_has_a_row_per_report_and_group(tmp_path, capsys):
    table = load_benchmark_tool('benchmark_table')
    first = _run_report(dict(commit='0123456789abcdef', modified=False),
                        {'mmswin-v1': [1.0, 2.0, 1.0], 'mmswin-v2': [1.5, 1.5, 1.5], 'mmdet-v1': [2.0, 3.0, 4.0]})
    first['results'] += _run_report({}, {'mmswin-v1': [2.0], 'mmdet-v1': [3.0]}, mode='train')['results']
    second = _run_report({}, {'mmswin-v1': [1.0], 'mmdet-v1': [1.5]}, processes=5, drop_path_rate=0.2,
                         malloc_env={'MALLOC_TRIM_THRESHOLD_': '1', 'THP_MEM_ALLOC_ENABLE': '1'})
    second['threads'] = 1
    lines = table.runs_table(['a/first.json', 'second.json'], [first, second])
    assert lines[2:] == [
        '| first | 0123456 | 2 threads | 1x3x64x64 | bf16 | inference | 1000 ms | 1500 ms | 3000 ms | 3.00x '
        '| 2.00x (1.50-4.00x) | 2.00x |',
        '| first | 0123456 | 2 threads | 1x3x64x64 | bf16 | train | 2000 ms |  | 3000 ms | 1.50x | 1.50x (1.50-1.50x) '
        '|  |',
        '| second |  | 1 thread, 5 processes, drop path 0.2, glibc MALLOC_TRIM_THRESHOLD_=1, THP_MEM_ALLOC_ENABLE=1 '
        '| 1x3x64x64 | bf16 | inference | 1000 ms |  | 1500 ms | 1.50x | 1.50x (1.50-1.50x) |  |']
    assert [line.split(' | ')[5] for line in table.runs_table(['f', 's'], [first, second], mode='train')[2:]] == [
        'train']
    assert len(table.runs_table(['f', 's'], [first, second], size='1x3x64x64', precision='bf16')) == 5
    assert table.runs_table(['f', 's'], [first, second], precision='fp32')[2:] == []
    # from the command line; the filters need --runs, and a selection without rows is an argument error
    reports = [ROOT / 'docs/reports/benchmark_zen4_settled_defaults_4.json',
               ROOT / 'docs/reports/benchmark_zen4_settled_bf16_train_14.json']
    text = table.main(['--runs', '--size', '1x3x800x1216', '--precision', 'bf16', '--mode', 'train',
                       *map(str, reports)])
    rows = [line.split(' | ') for line in text.splitlines()[2:]]
    assert [(r[0], r[9]) for r in rows] == [('| benchmark_zen4_settled_defaults_4', '1.61x'),
                                            ('| benchmark_zen4_settled_bf16_train_14', '1.51x')]
    for argv, message in ((['--mode', 'train'], 'select the rows of --runs; add --runs'),
                          (['--runs', '--precision', 'fp16'], 'no report has a group with mmswin-v1 and mmdet-v1')):
        with pytest.raises(SystemExit) as exit_info:
            table.main(argv + [str(reports[0])])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_flops_do_not_depend_on_earlier_forwards():
    """V2's position-bias MLP is counted whether or not an eager forward has cached its output."""
    model = SwinTransformerV2(embed_dims=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4).eval()
    fresh = backbone_flops(model, 64, 64)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert backbone_flops(model, 64, 64) == backbone_flops(model, 64, 64) == fresh


def test_benchmark_rows_from_known_times(tmp_path, monkeypatch):
    """Medians, ratios, FLOP rates and matmul shares of a report and its table, from timings given to the tool."""
    benchmark = load_benchmark_tool()
    times = {'mmswin-v1': [1.0, 2.0, 6.0], 'mmswin-v2': [2.0, 3.0, 3.0], 'mmdet-v1': [4.0, 4.0, 5.0]}
    rates = {'fp32': 1e9, 'bf16': 2e9}
    monkeypatch.setattr(benchmark, 'measure_group_in_worker', lambda *args: dict(
        times=times, matmul_flops_per_s=rates, matmul_flops_per_s_before=rates, matmul_flops_per_s_after=rates))
    monkeypatch.setattr(benchmark, 'matmul_rate', lambda device, precision: 1e9)
    monkeypatch.setattr(benchmark, 'flops_of', lambda size, window, version: 100 * version)
    report = benchmark.main(['--sizes', '1x3x32x32', '--models', 'mmswin-v1', 'mmswin-v2', 'mmdet-v1',
                             '--precisions', 'bf16', '--modes', 'train', '--repeats', '3', '--no-memory',
                             '--out', str(tmp_path / 'report.json')])
    rows = {row['model']: row for row in report['results']}
    for name, seconds in times.items():
        median, flops = statistics.median(seconds), 2 * 100 * benchmark.version_of(name) * 3  # forward + backward
        assert rows[name]['median_s'] == median and rows[name]['times_s'] == seconds
        assert rows[name]['flops_per_s'] == pytest.approx(flops / median)
        assert rows[name]['fraction_of_matmul'] == pytest.approx(flops / median / 2e9)
        assert rows[name]['fraction_of_fp32_matmul'] == pytest.approx(flops / median / 1e9)
    assert rows['mmswin-v1']['speedup_vs_mmdet-v1'] == pytest.approx(4.0 / 2.0)
    assert rows['mmswin-v1']['round_speedups_vs_mmdet-v1'] == pytest.approx([4.0, 2.0, 5.0 / 6.0])
    assert rows['mmswin-v2']['speedup_vs_mmdet-v1'] == pytest.approx(4.0 / 3.0)
    assert rows['mmswin-v2']['slowdown_vs_mmswin-v1'] == pytest.approx(3.0 / 2.0)
    assert 'speedup_vs_mmdet-v1' not in rows['mmdet-v1'] and 'slowdown_vs_mmswin-v1' not in rows['mmswin-v1']
    table = load_benchmark_tool('benchmark_table').speed_table([report])
    line = next(line for line in table if '| mmswin-v2 |' in line)
    assert line.startswith('| 1x3x32x32 | bf16 | train | mmswin-v2 | 3000 ms |') and line.endswith('| 1.33x | 1.50x |')
    line = next(line for line in table if '| mmswin-v1 |' in line)
    assert line.endswith('| 2.00x |  |')


def test_benchmark_cosine_compares_autocast_outputs_with_fp32_ones():
    benchmark = load_benchmark_tool()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)).eval()
    x = torch.randn(32, 64)
    (cosine,) = benchmark.cosine_to_fp32(model, x, 'bf16')
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        low = model(x)
    expected = torch.nn.functional.cosine_similarity(model(x).double().flatten(), low.double().flatten(), dim=0)
    assert cosine == pytest.approx(float(expected), abs=1e-12) and 0.99 < cosine < 1 - 1e-7


def test_get_flops_backbone_options_reach_the_model():
    """``--arch`` and ``--window-size`` build the backbone asked for: the published FLOPs of Swin-S at 224 and
    SwinV2-T with window 16 at 256 (the default size of a V2 backbone)."""
    get_flops = load_benchmark_tool('get_flops')
    small = get_flops.main(['SwinTransformer', '--arch', 'small', '--json'])
    assert small['input_shape'] == [1, 3, 224, 224] and small['flops'] / 1e9 == pytest.approx(8.7, abs=0.1)
    classifier = 768 * 1000 + 1000  # the ImageNet head: with it Swin-S has the 50M parameters of Table 1
    assert (small['params'] + classifier) / 1e6 == pytest.approx(50, abs=0.5)
    v2 = get_flops.main(['SwinTransformerV2', '--window-size', '16', '--json'])
    assert v2['input_shape'] == [1, 3, 256, 256] and v2['flops'] / 1e9 == pytest.approx(6.6, abs=0.1)


def test_get_flops_whole_detector_and_default_sizes():
    """A detection config counts the whole detector (more than backbone and neck, which are more than the
    backbone), at 800x1216 unless told; a segmentation config at 512x512."""
    from mmdet.registry import MODELS
    from mmengine.config import Config

    from mmswin.analysis import count_flops
    get_flops = load_benchmark_tool('get_flops')
    det = ROOT / 'configs/demo/mask-rcnn_swin-demo_fpn_demo-shapes-128.py'
    whole = get_flops.main([str(det), '--shape', '128', '--json'])
    backbone = get_flops.main([str(det), '--shape', '128', '--json', '--backbone-only'])
    model = MODELS.build(Config.fromfile(str(det)).model).eval()
    with torch.no_grad():
        features = count_flops(_ExtractFeat(model), (torch.zeros(1, 3, 128, 128),))
    assert whole['flops'] > features > backbone['flops'] > 0
    assert get_flops.main([str(det), '--json', '--backbone-only'])['input_shape'] == [1, 3, 800, 1216]
    seg = ROOT / 'configs/demo/swin-demo_upernet_demo-shapes-128x128.py'
    assert get_flops.main([str(seg), '--json', '--backbone-only'])['input_shape'] == [1, 3, 512, 512]


class _ExtractFeat(torch.nn.Module):
    def __init__(self, detector: torch.nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor):
        return self.detector.extract_feat(x)


def test_backbone_flops_leaves_the_model_in_its_mode():
    model = SwinTransformer(embed_dims=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
    model.train()
    backbone_flops(model, 64, 64)
    assert all(module.training for module in model.modules())
    model.eval()
    backbone_flops(model, 64, 64)
    assert not any(module.training for module in model.modules())
