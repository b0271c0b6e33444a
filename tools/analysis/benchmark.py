"""Speed and memory of mmswin's backbones against the peers installed in the same environment.

    python tools/analysis/benchmark.py                       # defaults: 1x3x800x1216 and 2x3x512x512
    python tools/analysis/benchmark.py --sizes 1x3x224x224 --precisions fp32 --repeats 3 --out report.json

Peers: mmdet's ``SwinTransformer`` (V1) always; mmpretrain's ``SwinTransformerV2`` and timm's Swin models when
they import. Every model of one size, precision and mode runs in a process of its own, and the models are
called in turn, one at a time (warm-up first): alternation spreads the machine's drift over all of them, and
separate processes keep one model's memory use from changing the page faults that the next one meets in the C
allocator (``--processes N``: the rounds shared out among N successive sets of fresh processes, since one
process of a model can run it faster or slower than the next). Medians and ratios are reported (the ratio of
the medians, and the ratios of the rounds, whose calls are minutes closer than the medians' may be; on CPU
with the page faults and system CPU time per call), with the peak memory of a training step in each precision
(CUDA max allocated; on CPU the peak of live tensors and the RSS growth of a separate worker process per
model, with glibc's default settings and with freed memory returned at once) and the FLOP/s reached against a
dense matmul measured on the same device at the start of the run and right before and right after each group
(the highest of the three: a moment when the device multiplied slowly would overstate the shares).
FLOPs are mmswin's count (tools/analysis/get_flops.py), the same for every model of a size, so FLOP/s compare
like with like.
"""
import argparse
import contextlib
import importlib
import itertools
import json
import multiprocessing as mp
import os
import os.path as osp
import queue as queue_module
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.autograd.graph import get_gradient_edge  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

ARCH = dict(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))  # Swin-T


# ---------------------------------------------------------------------------------------- models
def build_model(name: str, window: int, with_cp: bool = False, drop_path_rate: float = 0.0) -> torch.nn.Module:
    """A Swin-T backbone with four outputs, by name, with stochastic depth rising to ``drop_path_rate``."""
    if name in ('mmswin-v1', 'mmswin-v2'):
        from mmswin.models import SwinTransformer, SwinTransformerV2
        cls = SwinTransformerV2 if name == 'mmswin-v2' else SwinTransformer
        return cls(**ARCH, window_size=window, drop_path_rate=drop_path_rate, with_cp=with_cp)
    if name == 'mmdet-v1':
        from mmdet.models.backbones.swin import SwinTransformer
        return SwinTransformer(**ARCH, window_size=window, drop_path_rate=drop_path_rate, with_cp=with_cp)
    if name == 'mmpretrain-v2':
        from mmpretrain.models.backbones import SwinTransformerV2
        return SwinTransformerV2(arch='tiny', window_size=window, out_indices=(0, 1, 2, 3),
                                 drop_path_rate=drop_path_rate, with_cp=with_cp, pad_small_map=True)
    if name in ('timm-v1', 'timm-v2'):
        import timm
        arch = 'swin_tiny_patch4_window7_224' if name == 'timm-v1' else 'swinv2_tiny_window8_256'
        return timm.create_model(arch, features_only=True, window_size=window, strict_img_size=False,
                                 dynamic_img_pad=True, drop_path_rate=drop_path_rate)
    raise ValueError(f'unknown model {name!r}')


# Every name build_model takes, with the package it needs and the module of it that build_model imports (a
# package can import while that module does not: mmdet's Swin with an mmcv built without its ops).
MODEL_PACKAGES = {'mmswin-v1': 'mmswin', 'mmswin-v2': 'mmswin', 'mmdet-v1': 'mmdet', 'mmpretrain-v2': 'mmpretrain',
                  'timm-v1': 'timm', 'timm-v2': 'timm'}
MODEL_MODULES = {'mmswin-v1': 'mmswin.models', 'mmswin-v2': 'mmswin.models', 'mmdet-v1': 'mmdet.models.backbones.swin',
                 'mmpretrain-v2': 'mmpretrain.models.backbones', 'timm-v1': 'timm', 'timm-v2': 'timm'}


def available_models() -> List[str]:
    """The models whose code imports here, in :data:`MODEL_PACKAGES`' order."""
    return [name for name in MODEL_PACKAGES if import_failure(name) is None]


def import_failure(name: str) -> Optional[str]:
    """Why the module that model ``name`` is built from does not import (``ModuleNotFoundError: ...``), or None."""
    try:
        importlib.import_module(MODEL_MODULES[name])
    except Exception as error:  # noqa: BLE001 - any failure to import leaves the model out
        return f'{type(error).__name__}: {error}'
    return None


def model_name_error(flag: str, names: Sequence[str]) -> Optional[str]:
    """What is wrong with the model names given to ``flag``: an unknown or repeated name, or a model whose
    package does not import here; None when they can all be built."""
    unknown = [name for name in names if name not in MODEL_PACKAGES]
    if unknown:
        return (f'{flag}: unknown model{"s" if len(unknown) > 1 else ""} {", ".join(map(repr, unknown))}; '
                f'choose from {" ".join(MODEL_PACKAGES)}')
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        return f'{flag}: {", ".join(repeated)} given more than once'
    for name in dict.fromkeys(names):
        failure = import_failure(name)
        if failure:
            return (f'{flag}: {name} needs the package {MODEL_PACKAGES[name]} ({MODEL_MODULES[name]}), which does '
                    f'not import here ({failure}); models that can run here: {" ".join(available_models())}')
    return None


# ---------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _outputs(model: torch.nn.Module, x: torch.Tensor):
    out = model(x)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def step_fn(model: torch.nn.Module, x: torch.Tensor, mode: str, precision: str) -> Callable[[], None]:
    """One forward (``inference``) or forward+backward (``train``) of ``model`` on ``x``.

    The backward starts from fixed random gradients of the outputs, in their shapes and dtypes, as a neck
    would hand them to the backbone: drawn once, after the first call's forward (a warm-up round), and
    reused. No loss is computed: a loss such as ``sum(o.float().mean())`` adds work of its own to every
    model alike (fp32 copies of the outputs and output-sized gradients, about 75 ms of a bf16 training step
    at 800x1216 on the development CPU), which is not the backbone's. The outputs themselves are let go
    before the backward (it starts from their autograd edges), as a neck's backward would have released
    them by the time the backbone's runs: they do not count in the step's peak memory."""
    device = x.device
    grads: List[torch.Tensor] = []

    def inference() -> None:
        with torch.no_grad(), _autocast(device, precision):
            _outputs(model, x)

    def train() -> None:
        with _autocast(device, precision):
            outs = _outputs(model, x)
        if not grads:
            generator = torch.Generator(device=device).manual_seed(2)
            grads.extend(torch.randn(o.shape, dtype=o.dtype, device=o.device, generator=generator) for o in outs)
        edges = [get_gradient_edge(o) for o in outs]
        del outs
        torch.autograd.backward(edges, grads)
        model.zero_grad(set_to_none=True)

    return inference if mode == 'inference' else train


def timed_call(fn: Callable[[], None], device: torch.device) -> Tuple[float, int, float]:
    """Seconds of one call of ``fn``, with the process's page faults (minor and major) and system CPU
    seconds during it: on a CPU, the cost of fresh memory that the wall time alone does not show."""
    _sync(device)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    fn()
    _sync(device)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    faults = after.ru_minflt + after.ru_majflt - before.ru_minflt - before.ru_majflt
    return elapsed, faults, after.ru_stime - before.ru_stime


def _timing_worker(conn, name: str, window: int, size: List[int], precision: str, mode: str, device: str,
                   compile_model: bool, threads: int, drop_path_rate: float = 0.0) -> None:
    """Builds one model and times one call of its step each time the parent asks, until told to stop."""
    try:
        torch.set_num_threads(threads)
        import mmswin  # noqa: F401
        device = torch.device(device)
        torch.manual_seed(0)
        model = build_model(name, window, drop_path_rate=drop_path_rate).to(device)
        model.train(mode == 'train')  # (mmdet's Swin returns None from train())
        if compile_model:
            model = compiled(model, mode)
        x = torch.randn(*size, generator=torch.Generator().manual_seed(1)).to(device)
        step = step_fn(model, x, mode, precision)
        conn.send(('ready', os.getpid()))
        while conn.recv():
            conn.send(('call', timed_call(step, device)))
    except Exception:  # noqa: BLE001 - reported to the parent, which raises it with the model's name
        import traceback
        conn.send(('error', traceback.format_exc()))


def _reply(name: str, conn, proc) -> object:
    try:
        kind, value = conn.recv()
    except EOFError:
        raise RuntimeError(f'benchmark worker of {name} exited with {proc.exitcode}') from None
    if kind == 'error':
        raise RuntimeError(f'benchmark worker of {name} failed:\n{value}')
    return value


def call_order(names: List[str], rounds: int, calls_per_turn: int = 1,
               settle_calls: int = 0) -> Iterator[Tuple[int, str, bool]]:
    """``(round, model, timed)`` of every call: in each round, each model in turn for ``settle_calls``
    untimed calls and then ``calls_per_turn`` timed ones."""
    for round_ in range(rounds):
        for name in names:
            for call in range(settle_calls + calls_per_turn):
                yield round_, name, call >= settle_calls


def rounds_of(repeats: int, processes: int) -> List[int]:
    """The timed rounds of each of ``processes`` successive sets of workers: ``repeats`` shared out as evenly
    as whole rounds allow, the earlier sets taking the remainder."""
    return [repeats // processes + (i < repeats % processes) for i in range(processes)]


def time_in_workers(names: List[str], window: int, size: List[int], precision: str, mode: str, device: str,
                    repeats: int, warmup: int, compile_models: bool = False, calls_per_turn: int = 1,
                    settle_calls: int = 0, drop_path_rate: float = 0.0, processes: int = 1) -> dict:
    """Times of one step of every model, each model in its own process, the models taking turns
    (``warmup`` rounds of turns first, then ``repeats``) of ``settle_calls`` untimed calls and
    ``calls_per_turn`` timed ones. Alternation spreads the machine's drift over all models, and separate
    processes keep one model's allocations from changing the C allocator's state (and so the page faults)
    that the next one meets. The first call after another process's turn can pay for the switch: on a CPU,
    a training step's page faults can take twice the system time then, which a model in a training loop of
    its own does not pay; an untimed call leaves it out. In training every model has stochastic depth up to
    ``drop_path_rate``, each drawing from the same seed. With ``compile_models`` every model also runs
    compiled, named ``<model>+compile``, in a process of its own. With ``processes`` above 1 the rounds are
    shared out among that many successive sets of fresh workers (:func:`rounds_of`), each set warmed up on its
    own: how fast a model runs can differ from one process of it to the next (its memory's placement, the
    allocator's state), and one process per model would carry that into the ratios. Returns ``times``
    (seconds per timed call, in round order: call ``i`` of a round at ``round * calls_per_turn + i``),
    ``page_faults`` and ``system_s`` (per timed call) and ``pids`` (one per set), each by model."""
    if not 1 <= processes <= repeats:
        raise ValueError(f'processes must be from 1 to repeats ({repeats}), got {processes}')
    result: dict = dict(pids={}, times={}, page_faults={}, system_s={})
    for rounds in rounds_of(repeats, processes):
        _time_in_one_set(result, names, window, size, precision, mode, device, rounds, warmup, compile_models,
                         calls_per_turn, settle_calls, drop_path_rate)
    return result


def _time_in_one_set(result: dict, names: List[str], window: int, size: List[int], precision: str, mode: str,
                     device: str, repeats: int, warmup: int, compile_models: bool, calls_per_turn: int,
                     settle_calls: int, drop_path_rate: float) -> None:
    """One set of workers of :func:`time_in_workers`, its times appended to ``result``'s."""
    ctx = mp.get_context('spawn')
    specs = [(name, False) for name in names] + ([(name, True) for name in names] if compile_models else [])
    workers = {}
    try:
        for name, compile_model in specs:
            conn, child = ctx.Pipe()
            proc = ctx.Process(target=_timing_worker, args=(child, name, window, size, precision, mode, device,
                                                            compile_model, torch.get_num_threads(),
                                                            drop_path_rate))
            proc.start()
            child.close()
            workers[name + (COMPILED if compile_model else '')] = (conn, proc)
        for name, w in workers.items():
            result['pids'].setdefault(name, []).append(_reply(name, *w))
        for round_, name, timed in call_order(list(workers), warmup + repeats, calls_per_turn, settle_calls):
            conn, proc = workers[name]
            conn.send(True)
            elapsed, faults, system_s = _reply(name, conn, proc)
            if round_ >= warmup and timed:
                for key, value in zip(('times', 'page_faults', 'system_s'), (elapsed, faults, system_s)):
                    result[key].setdefault(name, []).append(value)
    finally:
        for conn, proc in workers.values():
            try:
                conn.send(False)
            except OSError:
                pass
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()


def matmul_rate(device: torch.device, precision: str, budget_s: float = 3.0) -> float:
    """Dense matmul FLOP/s of the device (multiply-adds count 2): the best of up to five timed products at
    each of n = 512, 1024, 2048, within about ``budget_s``."""
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(precision, torch.float32)
    best = 0.0
    deadline = time.perf_counter() + budget_s
    for n in (512, 1024, 2048):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b
        for _ in range(5):
            _sync(device)
            start = time.perf_counter()
            a @ b
            _sync(device)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - start))
            if time.perf_counter() > deadline:
                return best
    return best


def flops_of(size: List[int], window: int, version: int) -> int:
    """Multiply-adds of mmswin's Swin-T at ``size`` (mmswin.analysis)."""
    from mmswin.analysis import count_flops
    from mmswin.models import SwinTransformer, SwinTransformerV2
    cls = SwinTransformerV2 if version == 2 else SwinTransformer
    model = cls(**ARCH, window_size=window).eval()
    with torch.no_grad():
        return count_flops(model, (torch.zeros(*size),))


# ---------------------------------------------------------------------------------------- memory
def _peak_rss_bytes(reset: bool = False) -> int:
    """This process's resident-set high-water mark (VmHWM), optionally reset to the current RSS first.

    Not ``getrusage``: its maximum survives ``exec``, so a spawned worker would report its parent's size.
    """
    if reset:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) * 1024
    raise RuntimeError('no VmHWM in /proc/self/status')


def peak_tensor_bytes(step: Callable[[], None]) -> int:
    """Peak bytes of live CPU tensors during ``step``, above those alive before it (the CPU analogue of
    CUDA's max allocated), from the allocation records of the PyTorch profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]']
    live = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        live += record.nbytes()
        peak = max(peak, live)
    return peak


# glibc with its mmap threshold fixed at 128 KiB (which also stops it from rising): every block above it
# is mapped on allocation and unmapped when freed, so the resident set follows the live memory instead
# of also holding what the allocator keeps for reuse. Ignored by other C libraries. None: unset.
UNPOOLED_MALLOC_ENV = {'MALLOC_MMAP_THRESHOLD_': '131072', 'MALLOC_MMAP_MAX_': None,
                       'MALLOC_TRIM_THRESHOLD_': None, 'MALLOC_TOP_PAD_': None}


def started_model(name: str, window: int, size: List[int], precision: str, with_cp: bool,
                  device: torch.device) -> torch.nn.Module:
    """Model ``name`` in training mode on ``device`` after one small training step (``size``'s batch, 64x64
    images), so that what the libraries allocate once (thread pools, cuBLAS's workspace, cuDNN's handles) is
    not counted as a step's memory."""
    model = build_model(name, window, with_cp=with_cp).to(device)
    model.train()  # (mmdet's Swin returns None from train())
    step_fn(model, torch.randn(size[0], size[1], 64, 64, device=device), 'train', precision)()
    return model


def _memory_worker(name: str, window: int, size: List[int], precision: str, with_cp: bool,
                   count_tensors: bool, queue) -> None:
    torch.set_num_threads(torch.get_num_threads())
    import mmswin  # noqa: F401
    model = started_model(name, window, size, precision, with_cp, torch.device('cpu'))
    step = step_fn(model, torch.randn(*size), 'train', precision)
    base = _peak_rss_bytes(reset=True)
    step()
    result = dict(rss_bytes=max(0, _peak_rss_bytes() - base))
    if count_tensors:
        result['tensor_bytes'] = peak_tensor_bytes(step)
    queue.put(result)


def _set_environ(values: Dict[str, Optional[str]]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _run_memory_worker(args: tuple, env: Dict[str, Optional[str]]) -> Optional[dict]:
    """:func:`_memory_worker` in a fresh process started with ``env`` applied to the environment (``None``
    values unset)."""
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_worker, args=(*args, queue))
    saved = {key: os.environ.get(key) for key in env}
    try:
        _set_environ(env)
        proc.start()
    finally:
        _set_environ(saved)
    proc.join()
    return queue.get() if proc.exitcode == 0 and not queue.empty() else None


def peak_train_memory(name: str, window: int, size: List[int], precision: str, device: torch.device,
                      with_cp: bool = False) -> Optional[dict]:
    """Bytes a training step adds at its peak, after a small step (:func:`started_model`): on CUDA the max
    allocated (``tensor_bytes``; the CUDA reports in docs/reports, made before the small step was taken there,
    also count what a first step allocates once). On CPU, each in a fresh worker process: the peak of live
    tensors (``tensor_bytes``), the growth of the resident set under the environment's allocator settings
    (``rss_bytes``; with glibc's defaults it includes what the allocator keeps for reuse) and with
    :data:`UNPOOLED_MALLOC_ENV` (``rss_bytes_unpooled``, the resident set of live memory)."""
    if device.type == 'cuda':
        model = started_model(name, window, size, precision, with_cp, device)
        x = torch.randn(*size, device=device)
        step = step_fn(model, x, 'train', precision)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return dict(tensor_bytes=torch.cuda.max_memory_allocated(device) - base)
    args = (name, window, size, precision, with_cp)
    pooled = _run_memory_worker((*args, True), {})
    unpooled = _run_memory_worker((*args, False), UNPOOLED_MALLOC_ENV)
    if pooled is None or unpooled is None:
        return None
    return dict(pooled, rss_bytes_unpooled=unpooled['rss_bytes'])


# ---------------------------------------------------------------------------------------- profile
STEP_MARK = 'benchmark.step'  # the profiler's record of the step itself, on the thread that calls it


def profiled_step(step: Callable[[], None], record_shapes: bool = False) -> Tuple[list, object, float]:
    """One call of ``step`` under PyTorch's profiler: its operators' events, the thread that called it and
    the time of the call in seconds. The events of other threads are those of work that ``step`` shares out
    (mmswin's passes that give each thread whole chunks record their operators on the thread that runs
    them), which runs alongside the calling thread's own."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=record_shapes) as prof:
        with torch.profiler.record_function(STEP_MARK):
            step()
    events = prof.events()
    mark = next(e for e in events if e.name == STEP_MARK)
    return [e for e in events if e.name != STEP_MARK], mark.thread, mark.cpu_time_total / 1e6


def op_profile(step: Callable[[], None], top: int = 8) -> dict:
    """The ``top`` operators of one call of ``step`` by their own time on the thread that called it, each
    with that time's share of the call (``share``) and its own time summed over all threads (``self_ms``):
    with threads that run work of their own, the sum over all threads exceeds the call, and only the calling
    thread's times add up to it. Also the call's time and the operators' own time on the calling thread and
    on all others."""
    events, caller, step_s = profiled_step(step)
    ops: Dict[str, List[float]] = {}
    for e in events:
        times = ops.setdefault(e.name, [0.0, 0.0])
        times[0] += e.self_cpu_time_total / 1e3
        if e.thread == caller:
            times[1] += e.self_cpu_time_total / 1e3
    ranked = sorted(ops.items(), key=lambda item: item[1][1], reverse=True)
    step_ms = step_s * 1e3
    top_ops = [dict(op=op, self_ms=total, caller_ms=own, share=own / step_ms) for op, (total, own) in ranked[:top]]
    return dict(step_ms=step_ms, caller_ms=sum(t[1] for t in ops.values()),
                other_threads_ms=sum(t[0] - t[1] for t in ops.values()), ops=top_ops)


# Allocations without a kernel; views are recognised by their schema (OpOverload.is_view).
_NO_KERNEL = frozenset({'empty', 'empty_strided', 'new_empty', 'new_empty_strided', 'empty_like'})


class _OperatorCount(TorchDispatchMode):
    """Counts the operators dispatched below autograd, views and uninitialised allocations left out."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in _NO_KERNEL:
            self.count += 1
        return func(*args, **(kwargs or {}))


def operator_count(step: Callable[[], None]) -> int:
    """Operators that one call of ``step`` runs, forward and backward, counted below autograd with views and
    uninitialised allocations left out: on a GPU, which one image at a time leaves bound by kernel
    launches, each is one launch or more. On the CPU mmswin's passes run in cache-sized chunks, each
    chunk its own operators, so there the count is not a GPU's."""
    counter = _OperatorCount()
    with counter:
        step()
    return counter.count


# ---------------------------------------------------------------------------------------- products alone
PRODUCT_OPS = ('aten::mm', 'aten::addmm', 'aten::bmm', 'mkldnn::_linear_pointwise')
_DTYPES = {'float': torch.float32, 'c10::BFloat16': torch.bfloat16, 'c10::Half': torch.float16,
           'double': torch.float64}


def product_calls(step: Callable[[], None]) -> Dict[tuple, dict]:
    """The matrix products one call of ``step`` issues, by operator, operand shapes, strides and dtypes:
    how often each ran and its own time in the profile, on all threads and on the calling thread."""
    events, caller, _ = profiled_step(step, record_shapes=True)
    calls: Dict[tuple, dict] = {}
    for e in events:
        if e.name not in PRODUCT_OPS:
            continue
        n = 2 if e.name in ('aten::mm', 'aten::bmm') else 3  # tensor operands (addmm: bias first)
        operands = tuple((tuple(shape), tuple(stride), dtype) for shape, stride, dtype in
                         zip(e.input_shapes[:n], e.structured_input_strides[:n], e.input_dtypes[:n]))
        entry = calls.setdefault((e.name, operands), dict(count=0, profiled_s=0.0, profiled_caller_s=0.0))
        entry['count'] += 1
        entry['profiled_s'] += e.self_cpu_time_total / 1e6
        if e.thread == caller:
            entry['profiled_caller_s'] += e.self_cpu_time_total / 1e6
    return calls


def _replay(op: str, operands: tuple, device: torch.device) -> Callable[[], torch.Tensor]:
    """A call of ``op`` on random operands of the recorded shapes, strides and dtypes, into an output
    allocated once (the page faults of a fresh large output are not the product's arithmetic)."""
    tensors = []
    for shape, stride, dtype in operands:
        if not shape and not stride:
            tensors.append(None)  # an absent bias
            continue
        t = torch.empty_strided(shape, stride, dtype=_DTYPES.get(dtype, torch.float32), device=device)
        tensors.append(t.normal_())
    if op == 'aten::mm':
        out = torch.mm(*tensors)
        return lambda: torch.mm(*tensors, out=out)
    if op == 'aten::bmm':
        out = torch.bmm(*tensors)
        return lambda: torch.bmm(*tensors, out=out)
    if op == 'aten::addmm':
        out = torch.addmm(*tensors)
        return lambda: torch.addmm(*tensors, out=out)
    return lambda: torch.ops.mkldnn._linear_pointwise(*tensors, 'none', [], '')  # its epilogue left out


def products_alone(step: Callable[[], None], device: torch.device, repeats: int = 5) -> dict:
    """The time of ``step``'s matrix products when each runs alone: every distinct call (operator, shapes,
    strides, dtypes) replayed on random operands (:func:`_replay`), best of ``repeats``, times the number of
    its calls.
    With everything but the products free, ``step`` could not take less than this with these kernels.
    CPU only: the profile's own times of CUDA products are those of the launches."""
    calls = product_calls(step)
    alone = 0.0
    for (op, operands), entry in calls.items():
        fn = _replay(op, operands, device)
        fn()
        best = float('inf')
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            best = min(best, time.perf_counter() - start)
        alone += best * entry['count']
    return dict(alone_s=alone, profiled_s=sum(e['profiled_s'] for e in calls.values()),
                profiled_caller_s=sum(e['profiled_caller_s'] for e in calls.values()),
                calls=sum(e['count'] for e in calls.values()), distinct=len(calls))


# ---------------------------------------------------------------------------------------- agreement
def cosine_to_fp32(model: torch.nn.Module, x: torch.Tensor, precision: str) -> List[float]:
    """Per-output cosine similarity of ``precision`` autocast outputs to fp32 outputs."""
    with torch.no_grad():
        ref = _outputs(model, x)
        with _autocast(x.device, precision):
            low = _outputs(model, x)
    # in float64: an fp32 sum over millions of products is off by more than the differences measured
    return [float(F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0)) for a, b in zip(ref, low)]


def redraw_norm_weights(model: torch.nn.Module, seed: int = 3) -> None:
    """Every layer norm's weight drawn around 1 (``1 + 0.1 N(0, 1)``), as after training: V2's post-norms start
    at zero, which leaves its blocks' own weights without gradients."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm) and module.weight is not None:
                noise = torch.randn(module.weight.shape, generator=generator)
                module.weight.copy_(1 + 0.1 * noise)


def training_gradients(model: torch.nn.Module, x: torch.Tensor, precision: str,
                       out_grads: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The parameters' gradients of one ``precision`` forward+backward from the outputs' gradients
    ``out_grads`` (cast to the outputs' dtypes), by parameter name."""
    model.zero_grad(set_to_none=True)
    with _autocast(x.device, precision):
        outs = _outputs(model, x)
    torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(out_grads, outs)])
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def gradient_cosines_to_fp32(model: torch.nn.Module, x: torch.Tensor, precision: str) -> Dict[str, float]:
    """How close the parameters' gradients of a ``precision`` autocast training step are to the fp32 step's,
    from the same output gradients (random, bf16 values): per parameter with a non-zero fp32 gradient, the
    cosine similarity of the two, in float64. ``model`` is in training mode, without stochastic depth."""
    with torch.no_grad():
        shapes = [o.shape for o in _outputs(model, x)]
    generator = torch.Generator().manual_seed(2)
    out_grads = [torch.randn(s, generator=generator).bfloat16().float().to(x.device) for s in shapes]
    ref = training_gradients(model, x, 'fp32', out_grads)
    low = training_gradients(model, x, precision, out_grads)
    return {name: float(F.cosine_similarity(low[name].double().flatten(), g.double().flatten(), dim=0))
            for name, g in ref.items() if bool(g.any()) and name in low}


def gradient_cosine_to_fp32(model: torch.nn.Module, x: torch.Tensor, precision: str) -> dict:
    """:func:`gradient_cosines_to_fp32` summed up: the lowest cosine with its parameter, the median, and how many
    parameters fall under 0.999."""
    cosines = gradient_cosines_to_fp32(model, x, precision)
    worst = min(cosines, key=cosines.get)
    return dict(worst=cosines[worst], worst_parameter=worst, median=statistics.median(cosines.values()),
                parameters=len(cosines), below_0_999=sum(c < 0.999 for c in cosines.values()))


# ---------------------------------------------------------------------------------------- plot
def throughput_sweep(names: List[str], window: int, sides: List[int], device: str, repeats: int, warmup: int,
                     precisions: Sequence[str] = ('fp32',),
                     calls_per_turn: int = 1, settle_calls: int = 0,
                     processes: int = 1) -> Dict[str, Dict[str, Dict[int, float]]]:
    """Images per second of inference on ``side x side`` images (batch 1), per precision, model and side
    (timed as in :func:`time_in_workers`)."""
    sweep = {precision: {name: {} for name in names} for precision in precisions}
    for precision in precisions:
        for side in sides:
            timing = time_in_workers(names, window, [1, 3, side, side], precision, 'inference', device, repeats,
                                     warmup, calls_per_turn=calls_per_turn, settle_calls=settle_calls,
                                     processes=processes)
            for name, times in timing['times'].items():
                sweep[precision][name][side] = 1.0 / statistics.median(times)
    return sweep


def plot_sweep(sweep: Dict[str, Dict[str, Dict[int, float]]], path: str, device: str) -> None:
    """One line per model and precision: a colour per model, a line style per precision."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    styles = dict(zip(sweep, ['-', '--', ':']))
    models = list(dict.fromkeys(name for per_model in sweep.values() for name in per_model))
    colours = {name: f'C{i}' for i, name in enumerate(models)}
    for precision, per_model in sweep.items():
        for name, points in per_model.items():
            sides = sorted(points)
            ax.plot(sides, [points[s] for s in sides], marker='o', linestyle=styles[precision],
                    color=colours[name], label=f'{name} {precision}')
    ax.set_xlabel('input side (square image, batch 1)')
    ax.set_ylabel('images / s (inference)')
    ax.set_yscale('log')
    ax.set_title(f'Swin-T backbone throughput on {device}')
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize='small')
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- main
def cpu_identity(cpuinfo: str) -> Dict[str, object]:
    """Vendor, family, model and stepping of the first processor listed in ``cpuinfo``, the text of Linux's
    ``/proc/cpuinfo`` (the fields it lacks are left out). The name alone does not tell hosts apart: two
    machines of this project named ``AMD EPYC`` multiply in bf16 at about 1000 and 400 GFLOP/s."""
    fields = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor's block ends
        key, _, value = line.partition(':')
        fields[key.strip()] = value.strip()
    identity = {}
    for name, key in (('vendor', 'vendor_id'), ('family', 'cpu family'), ('model', 'model'),
                      ('stepping', 'stepping')):
        if key in fields:
            identity[name] = int(fields[key]) if fields[key].isdigit() else fields[key]
    return identity


def code_identity(root: str = ROOT) -> Dict[str, object]:
    """The code a report measured: mmswin's version and, in a git checkout at ``root``, its commit and whether
    tracked files differ from it (``commit`` None without git or outside a checkout)."""
    from mmswin.version import __version__
    identity: Dict[str, object] = dict(mmswin=__version__, commit=None)
    try:
        head = subprocess.run(['git', '-C', root, 'rev-parse', 'HEAD'], capture_output=True, text=True)
        changes = subprocess.run(['git', '-C', root, 'status', '--porcelain', '--untracked-files=no'],
                                 capture_output=True, text=True)
    except OSError:  # no git
        return identity
    if head.returncode == 0 and changes.returncode == 0:
        identity.update(commit=head.stdout.strip(), modified=bool(changes.stdout.strip()))
    return identity


def parse_size(text: str) -> List[int]:
    """``BxCxHxW`` as four positive integers, three channels (RGB, what every model takes)."""
    try:
        size = [int(v) for v in text.lower().split('x')]
    except ValueError:
        size = []
    if len(size) != 4 or min(size) < 1:
        raise argparse.ArgumentTypeError(f'size must be BxCxHxW of positive integers, got {text!r}')
    if size[1] != 3:
        raise argparse.ArgumentTypeError(f'size must have 3 channels (RGB images), got {text!r}')
    return size


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', type=parse_size, nargs='+', default=[[1, 3, 800, 1216], [2, 3, 512, 512]])
    parser.add_argument('--models', nargs='+', default=None,
                        help=f'default: all importable of {" ".join(MODEL_PACKAGES)}')
    parser.add_argument('--precisions', nargs='+', default=None, choices=['fp32', 'bf16', 'fp16'],
                        help='default: fp32 bf16 on CPU, fp32 fp16 bf16 on CUDA')
    parser.add_argument('--modes', nargs='+', default=['inference', 'train'], choices=['inference', 'train'])
    parser.add_argument('--window', type=int, default=7, help='window of every model (same work for all)')
    parser.add_argument('--drop-path-rate', type=float, default=0.0,
                        help='stochastic depth of every model in the timed training steps, rising over the blocks '
                        'to this rate (mmdet\'s Mask R-CNN Swin-T configs: 0.2); memory is measured without it')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--calls-per-turn', type=int, default=1,
                        help='timed calls of each model in a row before the next model takes its turn: '
                        '--repeats rounds of them')
    parser.add_argument('--settle-calls', type=int, default=1,
                        help='untimed calls at the start of each turn, after the other models\' turns (the '
                        'switch between processes can slow the first call: 0 times it)')
    parser.add_argument('--processes', type=int, default=1,
                        help='successive sets of fresh worker processes per group, the --repeats rounds shared '
                        'out among them, each set warmed up (a model\'s speed can differ from one process of it '
                        'to the next)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--no-memory', action='store_true', help='skip the memory measurements')
    parser.add_argument('--memory-models', nargs='+', default=None, help='models to measure memory of '
                        '(default: those of --models); each runs in a worker process')
    parser.add_argument('--out', default='work_dirs/benchmark/report.json', help='JSON report')
    parser.add_argument('--plot', default=None, help='also write a PNG of inference throughput against input '
                        'size (square images, batch 1, --plot-sizes) for every model and precision')
    parser.add_argument('--profile', action='store_true',
                        help='also record the top operators of one step of every model, size, precision and mode, '
                        'and (CPU) the time of its matrix products replayed alone')
    parser.add_argument('--compile', action='store_true',
                        help=f'also time every model compiled with torch.compile (inductor, static shapes; '
                        f'inference with frozen weights), named <model>{COMPILED}; it compiles in the warm-up')
    parser.add_argument('--plot-sizes', type=int, nargs='+', default=[224, 384, 512, 640, 800])
    args = parser.parse_args(argv)
    for flag, value, least in (('--repeats', args.repeats, 1), ('--warmup', args.warmup, 0),
                               ('--window', args.window, 1)):
        if value < least:
            parser.error(f'{flag} must be at least {least}, got {value}')
    if min(args.plot_sizes) < 1:
        parser.error(f'--plot-sizes must be positive, got {" ".join(map(str, args.plot_sizes))}')
    for flag, names in (('--models', args.models), ('--memory-models', args.memory_models)):
        error = model_name_error(flag, names) if names is not None else None
        if error:
            parser.error(error)
    if args.compile and args.warmup < 1:
        parser.error('--compile needs --warmup of at least 1 (the first call compiles)')
    if args.calls_per_turn < 1:
        parser.error(f'--calls-per-turn must be at least 1, got {args.calls_per_turn}')
    if not 1 <= args.processes <= args.repeats:
        parser.error(f'--processes must be from 1 to --repeats ({args.repeats}), got {args.processes}')
    if args.settle_calls < 0:
        parser.error(f'--settle-calls must be at least 0, got {args.settle_calls}')
    if not 0.0 <= args.drop_path_rate < 1.0:
        parser.error(f'--drop-path-rate must be in [0, 1), got {args.drop_path_rate}')
    return args


PEER = 'mmdet-v1'
COMPILED = '+compile'


def compiled(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``model`` through ``torch.compile`` with static shapes; in inference with inductor's freezing
    (weights folded in as constants, linear layers prepacked for oneDNN)."""
    return torch.compile(model, dynamic=False, options={'freezing': True} if mode == 'inference' else None)


def version_of(name: str) -> int:
    """1 or 2: the Swin version a model name (``mmswin-v2``, ``mmdet-v1+compile``) stands for."""
    return 2 if name.split('+')[0].endswith('v2') else 1


def build_models(names: List[str], window: int, device: torch.device,
                 drop_path_rate: float = 0.0) -> Dict[str, torch.nn.Module]:
    """The models by name, seeded, with mmdet's weights in mmswin's V1 (through the checkpoint converter)
    when both are there, so that their outputs can be compared."""
    torch.manual_seed(0)
    models = {name: build_model(name, window, drop_path_rate=drop_path_rate).to(device) for name in names}
    if 'mmswin-v1' in models and PEER in models:
        from mmswin.checkpoint.formats import convert_state_dict
        converted = convert_state_dict(models[PEER].state_dict()).state_dict
        models['mmswin-v1'].load_state_dict(converted, strict=True)
    return models


def measure_group(names: List[str], window: int, size: List[int], precision: str, mode: str, device: str,
                  repeats: int, warmup: int, profile: bool, compile_models: bool = False,
                  calls_per_turn: int = 1, settle_calls: int = 0, drop_path_rate: float = 0.0,
                  processes: int = 1) -> dict:
    """Times of every model at one size, precision and mode (:func:`time_in_workers`; with ``compile_models`` also of
    each one compiled, and in inference the cosine of the compiled outputs to the eager ones); with ``profile``
    the top operators and the operator count of each eager model; for fp32 inference the output difference of
    mmswin-v1 and mmdet-v1 (same weights); for lower precisions the agreement of every model's outputs with its
    fp32 outputs in inference, and of its parameter gradients with its fp32 ones in training
    (:func:`gradient_cosine_to_fp32`)."""
    import mmswin  # noqa: F401
    device = torch.device(device)
    # The device's rate right before the timing and right after: this machine's speed drifts over minutes.
    # The shares use the higher of the two, as a rate measured in a slow moment would overstate them.
    before = {p: matmul_rate(device, p) for p in sorted({'fp32', precision})}
    # compilation takes the first warm-up round
    timing = time_in_workers(names, window, size, precision, mode, str(device), repeats,
                             warmup + (1 if compile_models else 0), compile_models, calls_per_turn, settle_calls,
                             drop_path_rate, processes)
    after = {p: matmul_rate(device, p) for p in before}
    group = dict(matmul_flops_per_s={p: max(before[p], after[p]) for p in before},
                 matmul_flops_per_s_before=before, matmul_flops_per_s_after=after)
    group['times'] = timing['times']
    if device.type == 'cpu':
        group['page_faults'], group['system_s'] = timing['page_faults'], timing['system_s']
    # the checks below run here, on models built the same way
    models = build_models(names, window, device, drop_path_rate)
    x = torch.randn(*size, generator=torch.Generator().manual_seed(1)).to(device)
    for m in models.values():
        m.train(mode == 'train')
    fns = {name: step_fn(m, x, mode, precision) for name, m in models.items()}
    twins = ({name + COMPILED: compiled(m, mode) for name, m in models.items()}
             if compile_models and mode == 'inference' else {})
    if profile:
        for fn in fns.values():  # the profiles are of later calls: the first one draws the output gradients
            fn()
        group['profiles'] = {name: op_profile(fns[name]) for name in models}
        group['operators'] = {name: operator_count(fns[name]) for name in models}
        if device.type == 'cpu':
            group['products_alone'] = {name: products_alone(fns[name], device) for name in models}
    if twins:
        with torch.no_grad(), _autocast(device, precision):
            group['compiled_cosine'] = {
                name: [float(F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))
                       for a, b in zip(_outputs(models[name[:-len(COMPILED)]], x), _outputs(twin, x))]
                for name, twin in twins.items()}
    with fp32_products():  # the values checked against fp32 are fp32's, whatever the timings ran with
        if 'mmswin-v1' in models and PEER in models and precision == 'fp32' and mode == 'inference':
            with torch.no_grad():  # (the models are in eval mode here)
                ours, theirs = (_outputs(models[n], x) for n in ('mmswin-v1', PEER))
            group['max_abs_diff'] = [float((a - b).abs().max()) for a, b in zip(ours, theirs)]
        if precision != 'fp32' and mode == 'inference':
            # (in eval mode here; mmdet's train() and eval() return None)
            group['cosine'] = {name: cosine_to_fp32(model, x, precision) for name, model in models.items()}
        if precision != 'fp32' and mode == 'train':
            # every model, the peers too, on models of its own without stochastic depth (the same branches kept
            # in both precisions) and with the norms' weights off V2's zeros
            checked = build_models(names, window, device)
            group['gradient_cosine'] = {}
            for name, model in checked.items():
                redraw_norm_weights(model)
                model.train()
                group['gradient_cosine'][name] = gradient_cosine_to_fp32(model, x, precision)
    return group


@contextlib.contextmanager
def fp32_products() -> Iterator[None]:
    """fp32 matrix products and convolutions on CUDA, TF32 off: cuDNN takes TF32 for fp32 convolutions by
    default, rounding their inputs to 10 mantissa bits, so that two models with the same weights differ by
    about 1e-3 wherever cuDNN picks different algorithms for them (mmdet's and mmswin's patch embeddings:
    1.7e-3 in ``docs/reports/benchmark_cuda_3.json``). The settings are restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _group_worker(args: tuple, queue) -> None:
    queue.put(measure_group(*args))


def measure_group_in_worker(*args) -> dict:
    """:func:`measure_group` in a fresh process, which starts the models' timing processes and runs the
    checks of the group."""
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    proc = ctx.Process(target=_group_worker, args=(args, queue))
    proc.start()
    while True:  # the result is read before join: a large one must be read for the worker to exit
        try:
            group = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                raise RuntimeError(f'benchmark worker for {args[2:5]} exited with {proc.exitcode}') from None
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f'benchmark worker for {args[2:5]} exited with {proc.exitcode}')
    return group


def main(argv=None) -> dict:
    args = parse_args(argv)
    import mmswin  # noqa: F401
    device = torch.device(args.device)
    names = args.models or available_models()
    for name in MODEL_PACKAGES if args.models is None else ():
        if name not in names:
            print(f'left out {name}: {import_failure(name)}', file=sys.stderr)
    precisions = args.precisions or (['fp32', 'fp16', 'bf16'] if device.type == 'cuda' else ['fp32', 'bf16'])
    report = dict(device=str(device), threads=torch.get_num_threads(), torch=torch.__version__,
                  window=args.window, arch='Swin-T', repeats=args.repeats, calls_per_turn=args.calls_per_turn,
                  settle_calls=args.settle_calls, drop_path_rate=args.drop_path_rate, processes=args.processes,
                  code=code_identity(), shares_use_start_rate=True, results=[],
                  matmul_flops_per_s={p: matmul_rate(device, p) for p in {'fp32', *precisions}})
    if device.type == 'cpu':
        from mmswin.models.matmul import cpu_has_bf16_arithmetic
        # Without bf16 instructions mmswin multiplies bf16 values with the fp32 kernels (mmswin.models.matmul)
        report['cpu_bf16_arithmetic'] = cpu_has_bf16_arithmetic()
        from mmswin.models.cpu_kernels import kernels_available
        # mmswin's compiled kernels (bf16 inference attention), where built and the CPU runs them
        report['fused_cpu_kernels'] = kernels_available()
        report['cpu'] = torch._C._cpu._get_cpu_capability().get('cpu_name')
        if osp.exists('/proc/cpuinfo'):
            with open('/proc/cpuinfo') as f:
                report['cpu_id'] = cpu_identity(f.read())
        # allocator settings change CPU timings (fresh pages of large tensors cost page faults): glibc's, and
        # PyTorch's transparent huge pages for large CPU tensors
        report['malloc_env'] = {k: v for k, v in os.environ.items()
                                if k.startswith('MALLOC_') or k == 'THP_MEM_ALLOC_ENABLE'}
    peer = PEER
    for size in args.sizes:
        flops = {1: flops_of(size, args.window, 1), 2: flops_of(size, args.window, 2)}
        for precision in precisions:
            for mode in args.modes:
                group = measure_group_in_worker(names, args.window, size, precision, mode, str(device),
                                                args.repeats, args.warmup, args.profile, args.compile,
                                                args.calls_per_turn, args.settle_calls, args.drop_path_rate,
                                                args.processes)
                times = group['times']
                medians = {name: statistics.median(t) for name, t in times.items()}
                # (the rate around a group has been measured at half the start's, the timings unaffected)
                rates = {p: max(r, report['matmul_flops_per_s'][p]) for p, r in group['matmul_flops_per_s'].items()}
                rate = rates[precision]
                for name, median in medians.items():
                    work = flops[version_of(name)] * (3 if mode == 'train' else 1)
                    row = dict(size=size, precision=precision, mode=mode, model=name, median_s=median,
                               times_s=times[name], images_per_s=size[0] / median,
                               flops_per_s=2 * work / median, matmul_flops_per_s=rates,
                               matmul_flops_per_s_before=group['matmul_flops_per_s_before'],
                               matmul_flops_per_s_after=group['matmul_flops_per_s_after'],
                               fraction_of_matmul=2 * work / median / rate)
                    for key in ('page_faults', 'system_s'):
                        if name in group.get(key, {}):
                            row[key] = statistics.median(group[key][name])
                    if precision != 'fp32':
                        row['fraction_of_fp32_matmul'] = 2 * work / median / rates['fp32']
                    if peer in medians and name != peer:
                        row[f'speedup_vs_{peer}'] = medians[peer] / median
                        # both are called once per round, one after the other: the ratio of each round is
                        # free of the machine's drift between rounds
                        row[f'round_speedups_vs_{peer}'] = [p / t for p, t in zip(times[peer], times[name])]
                    if name == 'mmswin-v2' and 'mmswin-v1' in medians:
                        row['slowdown_vs_mmswin-v1'] = median / medians['mmswin-v1']
                    report['results'].append(row)
                    print(f'{"x".join(map(str, size)):>14} {precision:>4} {mode:>9} {name:>14} '
                          f'{median * 1e3:9.1f} ms  {row["fraction_of_matmul"] * 100:5.1f}% of matmul'
                          + (f'  x{row[f"speedup_vs_{peer}"]:.2f} vs {peer}' if f'speedup_vs_{peer}' in row else ''),
                          flush=True)
                for name, profile in group.get('profiles', {}).items():
                    report.setdefault('profiles', []).append(
                        dict(size=size, precision=precision, mode=mode, model=name, **profile,
                             operators=group['operators'][name]))
                for name, products in group.get('products_alone', {}).items():
                    report.setdefault('products_alone', []).append(
                        dict(size=size, precision=precision, mode=mode, model=name, **products))
                if 'max_abs_diff' in group:
                    report.setdefault('max_abs_diff_vs_mmdet', []).append(
                        dict(size=size, max_abs_diff=group['max_abs_diff']))
                for name, cosine in group.get('compiled_cosine', {}).items():
                    report.setdefault('compiled_cosine_to_eager', []).append(
                        dict(size=size, precision=precision, model=name, cosine=cosine))
                for name, cosine in group.get('cosine', {}).items():
                    report.setdefault('cosine_to_fp32', []).append(
                        dict(size=size, precision=precision, model=name, cosine=cosine))
                for name, agreement in group.get('gradient_cosine', {}).items():
                    report.setdefault('gradient_cosine_to_fp32', []).append(
                        dict(size=size, precision=precision, model=name, **agreement))
                write_report(report, args.out)
        if not args.no_memory:
            for precision, name in itertools.product(precisions, args.memory_models or names):
                for with_cp in ([False, True] if name.startswith(('mmswin', 'mmdet')) else [False]):
                    mem = peak_train_memory(name, args.window, size, precision, device, with_cp=with_cp) or {}
                    report.setdefault('train_peak_memory_bytes', []).append(
                        dict(size=size, precision=precision, model=name, with_cp=with_cp, **mem))
                    sizes = ', '.join(f'{key.replace("_bytes", "")} {value / 2 ** 20:.0f} MiB'
                                      for key, value in mem.items())
                    print(f'{"x".join(map(str, size)):>14} {precision:>4} memory {name:>14} with_cp={with_cp!s:>5}: '
                          + sizes,
                          flush=True)
                    write_report(report, args.out)
    if args.plot:
        report['throughput_sweep'] = throughput_sweep(names, args.window, args.plot_sizes, str(device), args.repeats,
                                                      args.warmup, precisions, args.calls_per_turn, args.settle_calls,
                                                      args.processes)
        plot_sweep(report['throughput_sweep'], args.plot, report['device'])
        print(f'plot written to {args.plot}')
    write_report(report, args.out)
    print(f'report written to {args.out}')
    return report


def write_report(report: dict, path: str) -> None:
    """The report as JSON, replaced whole (written after every group, so a stopped run keeps its rows)."""
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump(report, f, indent=1)
    os.replace(path + '.tmp', path)


if __name__ == '__main__':
    main()
