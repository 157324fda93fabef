"""Benchmark the fastai-timm U-Net against smp's Unet, the timm encoder alone and fastai's DynamicUnet.

Each measurement runs in a fresh process, so construction time and peak memory are not shared between
contenders, and the rounds alternate between contenders so that a slow spell of the machine hits all of
them. A run prints a table of medians and of ratios to smp and to the encoder alone (the floor), and writes
both to `bench/results/` as CSV and Markdown.

    python bench/bench_unet.py                      # the full grid: 3 encoders x 2 sizes
    python bench/bench_unet.py --encoders resnet34 --sizes 128 --rounds 2

Contenders (all with random weights, 2 output classes, batch 4, the same number of threads):
- `fastai_timm`: `create_unet_model(encoder, 2, (size, size), pretrained=False)`;
- `smp`: `segmentation_models_pytorch.Unet('tu-' + encoder, encoder_weights=None, classes=2)`;
- `floor`: `timm.create_model(encoder, features_only=True)`, the encoder alone, trained on the mean of its maps;
- `fastai`: fastai's `DynamicUnet` on torchvision's resnet34 (only in the resnet34 rows).

Measured: the training step (forward, cross-entropy backward, Adam step), inference (forward under
`torch.inference_mode`), peak resident memory during training minus the memory before the model was built,
and construction time (for `floor`, that is timm's own `create_model(features_only=True)`).
"""
import argparse, json, os, platform, resource, statistics, subprocess, sys, time
from pathlib import Path

RESULTS = Path(__file__).parent/'results'
CONTENDERS = ('fastai_timm', 'smp', 'floor', 'fastai')


def _rss_mib():
    "Current resident memory of this process in MiB, from /proc (Linux)"
    with open('/proc/self/statm') as f: return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def _builder(contender, encoder, size):
    "Import what `contender` needs and return a function that builds it, so that build times exclude imports"
    if contender == 'fastai_timm':
        from fastai_timm.vision.learner import create_unet_model
        return lambda: create_unet_model(encoder, 2, (size, size), pretrained=False)
    if contender == 'smp':
        import segmentation_models_pytorch as smp
        return lambda: smp.Unet('tu-' + encoder, encoder_weights=None, classes=2)
    if contender == 'floor':
        import timm
        return lambda: timm.create_model(encoder, features_only=True, pretrained=False)
    if contender == 'fastai':
        from fastai.vision.learner import create_unet_model
        from fastai.vision.models import resnet34
        return lambda: create_unet_model(resnet34, 2, (size, size), pretrained=False)
    raise ValueError(f'Unknown contender {contender!r}; expected one of {CONTENDERS}')


def _loss(contender, out, target):
    import torch.nn.functional as F
    if contender == 'floor': return sum(o.float().mean() for o in out)
    return F.cross_entropy(out, target)


def measure(contender, encoder, size, bs, steps, warmup, threads):
    "Build one contender and time it; runs inside a fresh process"
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    build = _builder(contender, encoder, size)
    base = _rss_mib()
    t0 = time.perf_counter()
    model = build()
    build_s = time.perf_counter() - t0
    x, y = torch.rand(bs, 3, size, size), torch.randint(0, 2, (bs, size, size))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    train = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        _loss(contender, model(x), y).backward()
        opt.step()
        if i >= warmup: train.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    model.eval()
    infer = []
    with torch.inference_mode():
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            model(x)
            if i >= warmup: infer.append(time.perf_counter() - t0)
    return dict(contender=contender, encoder=encoder, size=size, build_s=build_s, train_ms=1000*statistics.median(train),
                infer_ms=1000*statistics.median(infer), peak_mib=peak)


def run_one(args, contender, encoder, size):
    "Measure one contender in a fresh interpreter and return its record, or an error record"
    cmd = [sys.executable, __file__, '--worker', contender, encoder, str(size), '--bs', str(args.bs),
           '--steps', str(args.steps), '--warmup', str(args.warmup), '--threads', str(args.threads)]
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': str(args.threads)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    lines = [l for l in res.stdout.splitlines() if l.startswith('{')]
    if res.returncode or not lines:
        return dict(contender=contender, encoder=encoder, size=size, error=(res.stderr.strip().splitlines() or ['?'])[-1])
    return json.loads(lines[-1])


def _contenders(encoder, chosen=CONTENDERS):
    "The contenders measured for `encoder`: fastai's `DynamicUnet` only has a resnet34 row"
    return [c for c in CONTENDERS if c in chosen and (c != 'fastai' or encoder == 'resnet34')]


def summarize(records):
    "Medians per (encoder, size, contender), with ratios to smp and to the floor"
    rows, keys = [], sorted({(r['encoder'], r['size']) for r in records}, key=lambda k: (k[1], k[0]))
    metrics = ('train_ms', 'infer_ms', 'peak_mib', 'build_s')
    for enc, size in keys:
        med = {}
        for c in _contenders(enc):
            rs = [r for r in records if (r['encoder'], r['size'], r['contender']) == (enc, size, c) and 'error' not in r]
            if rs: med[c] = {m: statistics.median(r[m] for r in rs) for m in metrics}
        for c, m in med.items():
            row = dict(encoder=enc, size=size, contender=c, **{k: round(v, 3) for k, v in m.items()})
            for ref in ('smp', 'floor'):
                if ref in med and c != ref:
                    for k in ('train_ms', 'infer_ms', 'peak_mib'):
                        row[f'{k}/{ref}'] = round(m[k] / med[ref][k], 3) if med[ref][k] > 0 else None
            if 'floor' in med and c != 'floor': row['build_s/timm'] = round(m['build_s'] / med['floor']['build_s'], 3)
            rows.append(row)
    return rows


def to_markdown(rows):
    cols = ['encoder', 'size', 'contender', 'train_ms', 'infer_ms', 'peak_mib', 'build_s',
            'train_ms/smp', 'infer_ms/smp', 'peak_mib/smp', 'train_ms/floor', 'peak_mib/floor', 'build_s/timm']
    lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
    for r in rows: lines.append('| ' + ' | '.join('' if r.get(c) is None else str(r.get(c)) for c in cols) + ' |')
    return '\n'.join(lines)


def machine():
    import torch, timm, fastai
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"timm {timm.__version__}, fastai {fastai.__version__}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--encoders', nargs='+', default=['resnet34', 'convnext_tiny', 'efficientnet_b0'], help='timm encoder names')
    p.add_argument('--sizes', nargs='+', type=int, default=[128, 256], help='square input sizes in pixels')
    p.add_argument('--bs', type=int, default=4, help='batch size')
    p.add_argument('--steps', type=int, default=5, help='timed steps per process')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps before timing')
    p.add_argument('--rounds', type=int, default=3, help='fresh processes per contender, alternating contenders')
    p.add_argument('--contenders', nargs='+', default=list(CONTENDERS), choices=CONTENDERS, help='contenders to measure')
    p.add_argument('--threads', type=int, default=2, help='torch threads in every process')
    p.add_argument('--timeout', type=int, default=900, help='seconds allowed for one measuring process')
    p.add_argument('--out', default=str(RESULTS/'bench_unet'), help='path prefix of the CSV and Markdown results')
    p.add_argument('--worker', nargs=3, metavar=('CONTENDER', 'ENCODER', 'SIZE'), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        c, enc, size = args.worker
        print(json.dumps(measure(c, enc, int(size), args.bs, args.steps, args.warmup, args.threads)))
        return
    records = []
    for rnd in range(args.rounds):
        for size in args.sizes:
            for enc in args.encoders:
                order = _contenders(enc, args.contenders)
                order = order[rnd % len(order):] + order[:rnd % len(order)]
                for c in order:
                    rec = run_one(args, c, enc, size)
                    records.append(rec)
                    print(f"round {rnd+1}/{args.rounds} {enc} {size} {c}: " +
                          (rec['error'] if 'error' in rec else f"train {rec['train_ms']:.0f} ms, infer {rec['infer_ms']:.0f} ms, "
                           f"peak {rec['peak_mib']:.0f} MiB, build {rec['build_s']:.2f} s"), flush=True)
    rows = summarize(records)
    md = f"Machine: {machine()}; batch {args.bs}, {args.threads} threads, medians of {args.rounds} processes x {args.steps} steps.\n\n" + to_markdown(rows)
    print('\n' + md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import csv
    with open(out.with_suffix('.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99))
        w.writeheader(); w.writerows(rows)
    out.with_suffix('.md').write_text(md + '\n')
    errors = [r for r in records if 'error' in r]
    for r in errors: print(f"error: {r['encoder']} {r['size']} {r['contender']}: {r['error']}", file=sys.stderr)


if __name__ == '__main__': main()
