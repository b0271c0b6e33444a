"""Markdown tables from the JSON reports of tools/analysis/benchmark.py.

    python tools/analysis/benchmark_table.py docs/reports/benchmark.json

Prints the speed table (medians, images/s, share of the device's fp32 and own-precision matmul rate, ratios to
mmdet and V2/V1), the ratios to mmdet round by round, on CPU the page faults and system time per call, the
headroom over mmdet that the dense matmul rate leaves, the training memory table, bf16/fp16 agreement with
fp32, and, when the reports hold profiles, the matrix products replayed alone, the operators per call and the
top operators.

    python tools/analysis/benchmark_table.py --runs --size 1x3x800x1216 --precision bf16 docs/reports/*.json

prints instead one row per report and group: the medians and mmswin's ratios to mmdet, run by run.
"""
import argparse
import json
import os.path as osp
import statistics
from typing import Dict, List, Optional

# What every report of tools/analysis/benchmark.py holds, the earliest ones too: at the top, and in each result.
REPORT_KEYS = ('device', 'threads', 'torch', 'arch', 'window', 'repeats', 'matmul_flops_per_s', 'results')
RESULT_KEYS = ('size', 'precision', 'mode', 'model', 'median_s', 'times_s', 'images_per_s', 'flops_per_s',
               'fraction_of_matmul')


def _size(size: List[int]) -> str:
    return 'x'.join(map(str, size))


def speed_table(reports: List[dict]) -> List[str]:
    lines = ['| input | precision | mode | model | median | images/s | of fp32 matmul | of own-precision matmul '
             '| vs mmdet | V2 / V1 |', '| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |']
    for report in reports:
        for row in report['results']:
            fp32_rate = row.get('matmul_flops_per_s', report['matmul_flops_per_s']).get('fp32')
            own = row['fraction_of_matmul']
            of_fp32 = row.get('fraction_of_fp32_matmul', own if row['precision'] == 'fp32' else None)
            vs = row.get('speedup_vs_mmdet-v1')
            v2 = row.get('slowdown_vs_mmswin-v1')
            lines.append(
                f"| {_size(row['size'])} | {row['precision']} | {row['mode']} | {row['model']} "
                f"| {row['median_s'] * 1e3:.0f} ms | {row['images_per_s']:.2f} "
                f"| {'' if of_fp32 is None or fp32_rate is None else f'{of_fp32:.0%}'} | {own:.0%} "
                f"| {'' if vs is None else f'{vs:.2f}x'} | {'' if v2 is None else f'{v2:.2f}x'} |")
    return lines


def _round_speedups(report: dict, row: dict, peer: str) -> Optional[List[float]]:
    """``row``'s ratios to ``peer`` round by round; from the times of the two for reports written before the
    tool recorded them (their times are in round order too)."""
    if f'round_speedups_vs_{peer}' in row:
        return row[f'round_speedups_vs_{peer}']
    if row['model'] == peer:
        return None
    key = (row['size'], row['precision'], row['mode'])
    for other in report['results']:
        if other['model'] == peer and (other['size'], other['precision'], other['mode']) == key:
            return [p / t for p, t in zip(other['times_s'], row['times_s'])]
    return None


def round_table(reports: List[dict], peer: str = 'mmdet-v1') -> List[str]:
    """The ratio to ``peer`` round by round (each round calls every model once, in turn): the median and the
    range of the rounds' ratios, beside the ratio of the medians of the speed table."""
    rows = [(r, _round_speedups(report, r, peer)) for report in reports for r in report['results']]
    rows = [(r, rounds) for r, rounds in rows if rounds]
    if not rows:
        return []
    lines = [f'| input | precision | mode | model | vs {peer.split("-")[0]}, median of the rounds | lowest round '
             '| highest round |', '| --- | --- | --- | --- | ---: | ---: | ---: |']
    for r, rounds in rows:
        lines.append(f"| {_size(r['size'])} | {r['precision']} | {r['mode']} | {r['model']} "
                     f"| {statistics.median(rounds):.2f}x | {min(rounds):.2f}x | {max(rounds):.2f}x |")
    return lines


def kernel_table(reports: List[dict]) -> List[str]:
    """Per timed call on a CPU: page faults (fresh memory the C allocator mapped or got back from the
    kernel) and the system CPU time they and other system calls took, medians."""
    rows = [r for report in reports for r in report['results'] if 'page_faults' in r]
    if not rows:
        return []
    lines = ['| input | precision | mode | model | median | page faults per call | system CPU time per call |',
             '| --- | --- | --- | --- | ---: | ---: | ---: |']
    for r in rows:
        lines.append(f"| {_size(r['size'])} | {r['precision']} | {r['mode']} | {r['model']} "
                     f"| {r['median_s'] * 1e3:.0f} ms | {r['page_faults']:.0f} | {r['system_s'] * 1e3:.0f} ms |")
    return lines


def memory_table(reports: List[dict]) -> List[str]:
    if not any(report.get('train_peak_memory_bytes') for report in reports):
        return []
    columns = ('tensor_bytes', 'rss_bytes_unpooled', 'rss_bytes')
    lines = ['| input | precision | model | with_cp | peak live tensors | RSS growth, unpooled malloc '
             '| RSS growth, default malloc |',
             '| --- | --- | --- | --- | ---: | ---: | ---: |']
    for report in reports:  # every report's rows, each with_cp row against its own report's without
        # (reports written before the tool measured memory in each precision measured it in fp32)
        by_key: Dict[tuple, dict] = {(_size(m['size']), m.get('precision', 'fp32'), m['model'], m['with_cp']): m
                                     for m in report.get('train_peak_memory_bytes', [])}
        for (size, precision, model, with_cp), m in by_key.items():
            base = by_key.get((size, precision, model, False), {})
            cells = [_memory_cell(m.get(key), base.get(key) if with_cp else None) for key in columns]
            lines.append(f"| {size} | {precision} | {model} | {with_cp} | {' | '.join(cells)} |")
    return lines


def _memory_cell(value: Optional[int], without_cp: Optional[int]) -> str:
    """``1234 MiB``, with the cut against ``without_cp`` when given."""
    if value is None:
        return ''
    cell = f'{value / 2 ** 20:.0f} MiB'
    if not without_cp:
        return cell
    cut = 1 - value / without_cp
    return f"{cell} ({abs(cut):.0%} {'less' if cut >= 0 else 'more'})"


def agreement_table(reports: List[dict], key: str = 'cosine_to_fp32',
                    reference: str = 'fp32') -> List[str]:
    """Per-output cosine similarities of the report's ``key`` list, to ``reference``."""
    rows = [c for report in reports for c in report.get(key, [])]
    if not rows:
        return []
    lines = [f'| input | precision | model | cosine to {reference}, per output (stages 1-4) |',
             '| --- | --- | --- | --- |']
    for c in rows:
        cos = ', '.join(f'{v:.5f}' for v in c['cosine'])
        lines.append(f"| {_size(c['size'])} | {c['precision']} | {c['model']} | {cos} |")
    return lines


def gradient_table(reports: List[dict]) -> List[str]:
    """Per model, how close its parameters' gradients of a training step in a lower precision are to its fp32
    ones (the report's ``gradient_cosine_to_fp32``)."""
    rows = [g for report in reports for g in report.get('gradient_cosine_to_fp32', [])]
    if not rows:
        return []
    lines = ['| input | precision | model | gradients compared | lowest cosine to fp32 (parameter) | median | '
             'under 0.999 |', '| --- | --- | --- | ---: | ---: | ---: | ---: |']
    for g in rows:
        lines.append(f"| {_size(g['size'])} | {g['precision']} | {g['model']} | {g['parameters']} | "
                     f"{g['worst']:.5f} (`{g['worst_parameter']}`) | {g['median']:.5f} | {g['below_0_999']} |")
    return lines


def mmdet_agreement(reports: List[dict]) -> List[str]:
    rows = [d for report in reports for d in report.get('max_abs_diff_vs_mmdet', [])]
    return [f"mmswin-v1 with mmdet-v1's weights at {_size(d['size'])}, fp32: largest difference of the four "
            f"outputs {max(d['max_abs_diff']):.1e}" for d in rows]


def headroom_table(reports: List[dict], peer: str = 'mmdet-v1') -> List[str]:
    """Per size, precision and mode: the time of the work at the measured dense matmul rate (no network runs
    faster) and so the largest speedup over ``peer`` that any implementation could show on this device."""
    lines = ['| input | precision | mode | FLOPs | at the dense matmul rate | peer median | largest possible '
             'speedup over the peer | mmswin-v1 measured |', '| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |']
    for report in reports:
        rows = {(_size(r['size']), r['precision'], r['mode'], r['model']): r for r in report['results']}
        for (size, precision, mode, model), row in rows.items():
            if model != peer:
                continue
            flops = row['flops_per_s'] * row['median_s']
            bound = flops / row.get('matmul_flops_per_s', report['matmul_flops_per_s'])[precision]
            ours = rows.get((size, precision, mode, 'mmswin-v1'), {}).get(f'speedup_vs_{peer}')
            lines.append(f"| {size} | {precision} | {mode} | {flops / 1e9:.0f} G | {bound * 1e3:.0f} ms "
                         f"| {row['median_s'] * 1e3:.0f} ms | {row['median_s'] / bound:.2f}x "
                         f"| {'' if ours is None else f'{ours:.2f}x'} |")
    return lines if len(lines) > 2 else []


def products_table(reports: List[dict], peer: str = 'mmdet-v1') -> List[str]:
    """Per model: the time of its matrix products in the profile and replayed alone (each distinct call at
    its best), and the speedup over ``peer`` it would show if nothing but those products took time. The
    profiled time is the calling thread's where the report has it (the products that other threads ran
    alongside it in brackets), else that of all threads."""
    lines = ['| input | precision | mode | model | median | products, profiled | products alone '
             '| speedup over the peer with all else free |', '| --- | --- | --- | --- | ---: | ---: | ---: | ---: |']
    for report in reports:
        medians = {(_size(r['size']), r['precision'], r['mode'], r['model']): r['median_s']
                   for r in report['results']}
        for p in report.get('products_alone', []):
            key = (_size(p['size']), p['precision'], p['mode'])
            median, peer_median = medians.get(key + (p['model'],)), medians.get(key + (peer,))
            bound = '' if peer_median is None or not p['alone_s'] else f"{peer_median / p['alone_s']:.2f}x"
            profiled = f"{p['profiled_s'] * 1e3:.0f} ms"
            if 'profiled_caller_s' in p:  # (absent from reports of earlier versions of the tool)
                others = p['profiled_s'] - p['profiled_caller_s']
                profiled = f"{p['profiled_caller_s'] * 1e3:.0f} ms" + (f' (+{others * 1e3:.0f} other threads)'
                                                                        if others > 0 else '')
            lines.append(f"| {' | '.join(key)} | {p['model']} | {'' if median is None else f'{median * 1e3:.0f} ms'} "
                         f"| {profiled} | {p['alone_s'] * 1e3:.0f} ms | {bound} |")
    return lines if len(lines) > 2 else []


def profile_table(reports: List[dict], top: int = 4) -> List[str]:
    """Per model: the operators of one call, and its top operators by own time with their shares of the
    profiled call on the thread that called it, and the other threads' own time alongside it (reports of
    earlier versions of the tool: the top operators over all threads, as shares of their sum)."""
    rows = [p for report in reports for p in report.get('profiles', [])]
    if not rows:
        return []
    lines = ['| input | precision | mode | model | operators per call | profiled call | other threads '
             '| top operators by own time (shares of the call on its thread; without a call time, of all threads) |',
             '| --- | --- | --- | --- | ---: | ---: | ---: | --- |']
    for p in rows:
        ops = ', '.join(f"{o['op'].replace('aten::', '')} {o['share']:.0%}" for o in p['ops'][:top])
        count = p.get('operators')  # (absent from reports of earlier versions of the tool)
        call, others = (f"{p['step_ms']:.0f} ms", f"{p['other_threads_ms']:.0f} ms") if 'step_ms' in p else ('', '')
        lines.append(f"| {_size(p['size'])} | {p['precision']} | {p['mode']} | {p['model']} "
                     f"| {'' if count is None else count} | {call} | {others} | {ops} |")
    return lines


def code_text(report: dict) -> str:
    """The short commit a report measured, ``+changes`` where tracked files differed from it; empty for reports
    written before the tool recorded it, or outside a git checkout."""
    code = report.get('code') or {}
    if not code.get('commit'):
        return ''
    return code['commit'][:7] + ('+changes' if code.get('modified') else '')


def settings_text(report: dict) -> str:
    """``2 threads`` and what else changes a run's timings: successive processes per model, stochastic depth,
    glibc's allocator settings and PyTorch's transparent huge pages from the environment."""
    parts = [f"{report['threads']} thread{'s' if report['threads'] != 1 else ''}"]
    if report.get('processes', 1) > 1:
        parts.append(f"{report['processes']} processes")
    if report.get('drop_path_rate'):
        parts.append(f"drop path {report['drop_path_rate']}")
    env = report.get('malloc_env') or {}
    if any(key.startswith('MALLOC_') for key in env):
        parts.append('glibc ' + ' '.join(f'{key}={env[key]}' for key in sorted(env) if key.startswith('MALLOC_')))
    if 'THP_MEM_ALLOC_ENABLE' in env:
        parts.append(f"THP_MEM_ALLOC_ENABLE={env['THP_MEM_ALLOC_ENABLE']}")
    return ', '.join(parts)


def runs_table(paths: List[str], reports: List[dict], size: Optional[str] = None, precision: Optional[str] = None,
               mode: Optional[str] = None, peer: str = 'mmdet-v1') -> List[str]:
    """One row per report and group (input, precision, mode) that match the filters: the medians of mmswin-v1,
    mmswin-v2 and ``peer``, mmswin-v1's ratio to ``peer`` (the ratio of the medians; the median and range of
    the rounds' ratios) and mmswin-v2's."""
    short = peer.split('-')[0]
    lines = [f'| report | code | settings | input | precision | mode | mmswin-v1 | mmswin-v2 | {short} '
             f'| mmswin-v1 vs {short} | median of the rounds (range) | mmswin-v2 vs {short} |',
             '| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: |']
    for path, report in zip(paths, reports):
        groups: Dict[tuple, Dict[str, dict]] = {}
        for r in report['results']:
            groups.setdefault((_size(r['size']), r['precision'], r['mode']), {})[r['model']] = r
        for key, models in groups.items():
            if any(want is not None and want != have for want, have in zip((size, precision, mode), key)):
                continue
            v1, v2, other = (models.get(name) for name in ('mmswin-v1', 'mmswin-v2', peer))
            if v1 is None or other is None:
                continue
            rounds = _round_speedups(report, v1, peer)
            spread = (f'{statistics.median(rounds):.2f}x ({min(rounds):.2f}-{max(rounds):.2f}x)' if rounds else '')
            cells = [osp.splitext(osp.basename(path))[0], code_text(report), settings_text(report), *key]
            cells += ['' if r is None else f"{r['median_s'] * 1e3:.0f} ms" for r in (v1, v2, other)]
            cells += [f"{other['median_s'] / v1['median_s']:.2f}x", spread,
                      '' if v2 is None else f"{other['median_s'] / v2['median_s']:.2f}x"]
            lines.append(f"| {' | '.join(cells)} |")
    return lines


def cpu_text(report: dict) -> str:
    """``, on <name> (<vendor> family F model M stepping S)`` for a CPU report: its name and, where recorded,
    the part (reports written before the tool recorded it have the name only)."""
    if 'cpu' not in report:
        return ''
    identity = report.get('cpu_id') or {}
    part = ' '.join(f'{key} {identity[key]}' for key in ('family', 'model', 'stepping') if key in identity)
    part = ' '.join(filter(None, (identity.get('vendor'), part)))
    return f", on {report['cpu']}" + (f' ({part})' if part else '')


def _rate_spans(rows: List[dict], key: str) -> str:
    """``bf16 402.2-431.3, fp32 178.5-205.9``: the range of the rates under ``key`` of the rows, in GFLOP/s."""
    per_precision: Dict[str, List[float]] = {}
    for row in rows:
        for p, r in row.get(key, {}).items():
            per_precision.setdefault(p, []).append(r / 1e9)
    return ', '.join(f'{p} {min(v):.1f}-{max(v):.1f}' for p, v in sorted(per_precision.items()))


def rate_lines(report: dict) -> List[str]:
    """The dense matmul rates measured around the groups of ``report``: right before each one, and in newer
    reports also right after it (the shares then use the higher of the two, and since reports have
    ``shares_use_start_rate``, the run's start rate where it is higher still)."""
    rows = report['results']
    if not any('matmul_flops_per_s' in row for row in rows):
        return []
    if not any('matmul_flops_per_s_after' in row for row in rows):
        return [f"- measured again before each group (the rates the shares use): "
                f"{_rate_spans(rows, 'matmul_flops_per_s')} GFLOP/s"]
    used = ("the highest of each group's two and the start's" if report.get('shares_use_start_rate') else
            "the higher of each group's two")
    return [f"- measured again right before each group: {_rate_spans(rows, 'matmul_flops_per_s_before')} GFLOP/s; "
            f"right after it: {_rate_spans(rows, 'matmul_flops_per_s_after')} GFLOP/s; the shares use {used}: "
            f"{_rate_spans(rows, 'matmul_flops_per_s')} GFLOP/s"]


def report_problem(report: object) -> Optional[str]:
    """What keeps ``report`` (parsed JSON) from being a report of tools/analysis/benchmark.py, or None."""
    if not isinstance(report, dict):
        kind = {list: 'an array', str: 'a string', bool: 'a boolean', int: 'a number', float: 'a number'}
        return f"{kind.get(type(report), 'null')}, not an object"
    missing = [key for key in REPORT_KEYS if key not in report]
    if missing:
        return f'missing key{"s" if len(missing) > 1 else ""} {", ".join(map(repr, missing))}'
    if not isinstance(report['results'], list):
        return "'results' is not a list"
    if not isinstance(report['matmul_flops_per_s'], dict):
        return "'matmul_flops_per_s' is not an object"
    for index, row in enumerate(report['results']):
        if not isinstance(row, dict):
            return f'results[{index}] is not an object'
        missing = [key for key in RESULT_KEYS if key not in row]
        if missing:
            return f'results[{index}] misses key{"s" if len(missing) > 1 else ""} {", ".join(map(repr, missing))}'
    return None


def load_report(path: str):
    """The report in the JSON file ``path``, or the message of what is wrong with it: a file that cannot be
    read, is not JSON, or is not a report of tools/analysis/benchmark.py (:func:`report_problem`)."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as error:
        return f'cannot read report {path}: {error.strerror or error}'
    try:
        report = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return f'report {path} is not JSON: {error}'
    problem = report_problem(report)
    if problem:
        return f'report {path} is not a benchmark report (tools/analysis/benchmark.py): {problem}'
    return report


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('reports', nargs='+', help='JSON reports of tools/analysis/benchmark.py')
    parser.add_argument('--runs', action='store_true',
                        help="only one row per report and group: medians and mmswin's ratios to mmdet")
    parser.add_argument('--size', help='with --runs: only this input, e.g. 1x3x800x1216')
    parser.add_argument('--precision', help='with --runs: only this precision (fp32, bf16, fp16)')
    parser.add_argument('--mode', choices=('inference', 'train'), help='with --runs: only this mode')
    args = parser.parse_args(argv)
    if not args.runs and (args.size or args.precision or args.mode):
        parser.error('--size, --precision and --mode select the rows of --runs; add --runs')
    reports = []
    for path in args.reports:
        report = load_report(path)
        if isinstance(report, str):
            parser.error(report)
        reports.append(report)
    if args.runs:
        lines = runs_table(args.reports, reports, args.size, args.precision, args.mode)
        if len(lines) == 2:
            parser.error('no report has a group with mmswin-v1 and mmdet-v1 that matches --size, --precision '
                         'and --mode')
        text = '\n'.join(lines)
        print(text)
        return text
    first = reports[0]
    parts = [f"Device {first['device']}, {first['threads']} threads, torch {first['torch']}, {first['arch']} "
             f"window {first['window']}.", '']
    for path, report in zip(args.reports, reports):
        rates = ', '.join(f'{p} {r / 1e9:.1f} GFLOP/s' for p, r in sorted(report['matmul_flops_per_s'].items()))
        turn = report.get('calls_per_turn', 1)
        calls = (f'{report["repeats"]} timed repeats' if turn == 1 else
                 f'{report["repeats"]} round{"s" if report["repeats"] != 1 else ""} of {turn} timed calls in a row')
        settle = report.get('settle_calls', 0)
        if settle:
            calls += f' per model, each turn after {settle} untimed call{"s" if settle != 1 else ""}'
        else:
            calls += ' per model'
        if report.get('processes', 1) > 1:
            calls += f', the rounds shared out among {report["processes"]} successive processes of each model'
        if report.get('drop_path_rate'):
            calls += (f'; training steps with stochastic depth up to {report["drop_path_rate"]} (their shares of '
                      f'the matmul rate and dense-rate bounds count every branch, the dropped ones too)')
        code = code_text(report)
        parts.append(f'- `{path}`: {calls}{cpu_text(report)}; dense matmul at '
                     f'the start {rates}' + (f'; code at {code}' if code else ''))
        parts += rate_lines(report)
    parts.append('')
    for table in (speed_table(reports), round_table(reports), kernel_table(reports), headroom_table(reports),
                  products_table(reports), memory_table(reports),
                  agreement_table(reports), gradient_table(reports),
                  agreement_table(reports, 'compiled_cosine_to_eager', 'the eager model, same precision'),
                  mmdet_agreement(reports), profile_table(reports)):
        if table:
            parts += table + ['']
    text = '\n'.join(parts)
    print(text)
    return text


if __name__ == '__main__':
    main()
