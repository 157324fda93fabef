"""Sweep one model of every timm family through the fastai-timm U-Net, and through smp's U-Net for comparison.

A family is a module of `timm.models` (`timm.list_modules()`). Its representative is the smallest model of the
module, by parameter count, that timm can build with `features_only=True`. Parameters are counted on the meta
device, so nothing is allocated. timm's synthetic `test_*` models are left out because they stand for no
family of their own (the pytest suite covers them). A module with no model that builds with
`features_only=True` is listed with the reason and left out of the pass rate.

Each model then runs in its own process with a time limit, once per contender. The processes are forked from
one that has imported torch, timm, smp and fastai-timm, so none of them pays the import time again:

- `fastai_timm`: `create_unet_model(name, 2, native, pretrained=False)`, a forward pass at the native size
  (`pretrained_cfg['input_size']`), one training step at that size (cross-entropy backward, SGD step), a U-Net
  built for an odd size and run at it (what `unet_learner` does with data of that size), and `n_in=1` at the
  odd size;
- `smp`: `segmentation_models_pytorch.Unet('tu-' + name, encoder_weights=None, classes=2)` at the native size
  and at the odd size.

    python bench/coverage.py                             # the full sweep, both contenders
    python bench/coverage.py --models vit_tiny_patch16_224,levit_128s --out /tmp/cov
    python bench/coverage.py --select-only               # only print the representatives

Writes `coverage.csv` (fastai-timm) and `coverage_smp.csv` (smp) under `--out`, and prints a Markdown summary.
"""
import argparse, csv, json, os, subprocess, sys, time
from pathlib import Path

RESULTS = Path(__file__).parent/'results'
FASTAI_STEPS = ('build', 'forward', 'odd', 'train', 'n_in_1')
SMP_STEPS = ('build', 'forward', 'odd')


def _offline():
    # No weights hub is reachable, and every model here is built with random weights.
    os.environ['HF_HUB_OFFLINE'] = '1'
    import warnings
    warnings.filterwarnings('ignore')


def _reason(e):
    "A one-line reason for exception `e`, for the CSV"
    msg = ' '.join(str(e).split())
    return f'{type(e).__name__}: {msg[:300]}'


# ---------------------------------------------------------------- choosing the representatives

def _meta_params(name):
    "Parameter count of `name` built with `features_only=True` on the meta device; raises when timm cannot build it so"
    import timm, torch
    with torch.device('meta'): model = timm.create_model(name, pretrained=False, features_only=True)
    return sum(p.numel() for p in model.parameters())


def select(modules=None):
    "One row per timm module: its smallest model that builds with `features_only=True`, or the reason there is none"
    _offline()
    import timm
    rows = []
    for module in modules or timm.list_modules():
        names = [n for n in timm.list_models(module=module) if not n.startswith('test_')]
        sized, errors = [], []
        for name in names:
            try: sized.append((_meta_params(name), name))
            except Exception as e: errors.append(_reason(e))
        if sized:
            params, name = min(sized)
            rows.append(dict(module=module, model=name, params_m=round(params/1e6, 2), features='yes', reason=''))
        else:
            reason = errors[0] if errors else 'no models besides test_* models'
            rows.append(dict(module=module, model=names[0] if names else '', params_m='', features='no', reason=reason))
    return rows


# ---------------------------------------------------------------- one model, in its own process

def _sizes(name):
    "The native input size of `name` and an odd size below it that no stride divides"
    import timm
    h, w = timm.get_pretrained_cfg(name).to_dict()['input_size'][-2:]
    return (h, w), (round(0.9*h) | 1, round(0.8*w) | 1)


_report = None  # set in the forked process: sends the record so far to the parent


def _step(rec, key, fn):
    "Run `fn`, store 'ok' or the reason under `key`; return its result, or None when it raised"
    try:
        out = fn()
        rec[key] = 'ok'
    except Exception as e:
        rec[key], out = _reason(e), None
    if _report is not None: _report(rec)
    return out


def _check_out(out, shape):
    if tuple(out.shape) != shape: raise RuntimeError(f'output shape {tuple(out.shape)}, expected {shape}')


def _forward(model, n_in, size):
    import torch
    model.eval()
    with torch.no_grad(): _check_out(model(torch.randn(1, n_in, *size)), (1, 2, *size))


def _train_step(model, size):
    "One training step on random data; raise unless the loss is finite and the decoder's last layer moved"
    import torch, torch.nn.functional as F
    torch.manual_seed(0)
    model.train()
    # SGD keeps no state per weight, so the largest families (400M parameters) fit in memory.
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x, y = torch.randn(2, 3, *size), torch.randint(0, 2, (2, *size))
    out = model(x)
    _check_out(out, (2, 2, *size))
    loss = F.cross_entropy(out, y)
    last = [p for p in model.parameters() if p.requires_grad][-1]
    before = last.detach().clone()
    loss.backward()
    opt.step()
    if not torch.isfinite(loss): raise RuntimeError(f'loss is {loss.item()}')
    if torch.equal(before, last.detach()): raise RuntimeError('the optimizer step changed no weight of the last layer')


def _describe(model, rec):
    "Record the encoder's pyramid: timm's strides and channels, the layout, and the levels the U-Net uses"
    body = model.encoder
    rec['strides'] = ' '.join(str(s) for s in body.model.feature_info.reduction())
    rec['channels'] = ' '.join(str(c) for c in body.model.feature_info.channels())
    rec['layout'] = body.fmt
    rec['neck'] = type(body.neck).__name__ if getattr(body, 'neck', None) is not None else ''
    rec['unet_strides'] = ' '.join(str(body.levels[i].stride) for i in model.keep)
    rec['locked_size'] = 'x'.join(map(str, body.locked_img_size)) if body.locked_img_size else ''


def run_fastai(name):
    _offline()
    import torch
    from fastai_timm.vision.learner import create_unet_model
    native, odd = _sizes(name)
    rec = dict(native='x'.join(map(str, native)), odd='x'.join(map(str, odd)))
    model = _step(rec, 'build', lambda: create_unet_model(name, 2, native, pretrained=False))
    if model is None: return rec
    _describe(model, rec)
    _step(rec, 'forward', lambda: _forward(model, 3, native))
    _step(rec, 'train', lambda: _train_step(model, native))
    del model
    # `unet_learner` builds the U-Net for the size of the data, and so does this check.
    _step(rec, 'odd', lambda: _forward(create_unet_model(name, 2, odd, pretrained=False), 3, odd))
    _step(rec, 'n_in_1', lambda: _forward(create_unet_model(name, 2, odd, pretrained=False, n_in=1), 1, odd))
    return rec


def run_smp(name):
    _offline()
    import segmentation_models_pytorch as smp
    native, odd = _sizes(name)
    rec = dict(native='x'.join(map(str, native)), odd='x'.join(map(str, odd)))
    model = _step(rec, 'build', lambda: smp.Unet('tu-' + name, encoder_weights=None, classes=2))
    if model is None: return rec
    _step(rec, 'forward', lambda: _forward(model, 3, native))
    _step(rec, 'odd', lambda: _forward(model, 3, odd))
    return rec


def _run_child(contender, name, send):
    "Body of the forked process: send the record after every step, so that a time-out keeps the steps done"
    global _report
    _report = send.send
    try: rec = (run_fastai if contender == 'fastai_timm' else run_smp)(name)
    except Exception as e: rec = dict(error=f'the sweep itself failed: {_reason(e)}')
    send.send(dict(rec, done=True))


def _import_all():
    "Import what the children need once, before they are forked, so that no child pays for it"
    _offline()
    import timm, torch, segmentation_models_pytorch
    import fastai_timm.vision.learner


# ---------------------------------------------------------------- the sweep

def _child(contender, name, timeout):
    "Run one model in a forked process; a time-out or a crash becomes the reason of the step that did not finish"
    import multiprocessing as mp
    ctx = mp.get_context('fork')
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_run_child, args=(contender, name, send), daemon=True)
    start = time.perf_counter()
    proc.start()
    send.close()
    rec = {}
    try:
        while not rec.get('done'):
            left = timeout - (time.perf_counter() - start)
            if left <= 0 or not recv.poll(left):
                rec['error'] = f'timed out after {timeout:.0f} s'
                break
            rec = recv.recv()
    except EOFError:
        proc.join(10)
        rec['error'] = f'the process died (exit code {proc.exitcode})'
    finally:
        if proc.is_alive(): proc.kill()
        proc.join()
    rec.pop('done', None)
    rec['seconds'] = round(time.perf_counter() - start, 1)
    return rec


def _verdict(rec, steps):
    "'pass' when every step is 'ok'; otherwise 'fail' and the first reason"
    if rec.get('error'):
        pending = next((s for s in steps if s not in rec), None)
        return 'fail', f"{pending}: {rec['error']}" if pending else rec['error']
    for step in steps:
        if rec.get(step, 'not run') != 'ok': return 'fail', f"{step}: {rec.get(step, 'not run')}"
    return 'pass', ''


def sweep(rows, contenders, timeout, budget, jobs, results=None, save=None):
    "Run every selected model for every contender, `jobs` processes at a time, within `budget` seconds"
    from concurrent.futures import ThreadPoolExecutor
    start = time.perf_counter()
    results = results or {c: {} for c in contenders}
    todo = [(c, r) for r in rows if r['features'] == 'yes' for c in contenders if r['model'] not in results[c]]

    def one(item):
        contender, row = item
        left = budget - (time.perf_counter() - start)
        if left < 5: rec = dict(error=f'not run: the sweep budget of {budget} s was spent')
        else: rec = _child(contender, row['model'], min(timeout, left))
        steps = FASTAI_STEPS if contender == 'fastai_timm' else SMP_STEPS
        rec['status'], rec['reason'] = _verdict(rec, steps)
        results[contender][row['model']] = rec
        # Written after every model, so that an interrupted sweep keeps what it measured (see --resume).
        if save is not None: save(results)
        print(f"{contender:12s} {row['model']:45s} {rec['status']:5s} {rec.get('seconds', '')!s:>6s}s {rec['reason'][:110]}",
              file=sys.stderr, flush=True)

    with ThreadPoolExecutor(jobs) as pool: list(pool.map(one, todo))
    return results


FASTAI_COLUMNS = ('module', 'model', 'params_m', 'strides', 'channels', 'layout', 'neck', 'unet_strides', 'locked_size',
                  'native', 'odd') + FASTAI_STEPS + ('status', 'seconds', 'reason')
SMP_COLUMNS = ('module', 'model', 'native', 'odd') + SMP_STEPS + ('status', 'seconds', 'reason')


def write_csv(path, columns, rows, results):
    with open(path, 'w', newline='') as f:
        out = csv.DictWriter(f, columns, extrasaction='ignore')
        out.writeheader()
        for row in rows:
            rec = dict(row)
            if row['features'] == 'yes': rec.update(results.get(row['model'], {}))
            else: rec.update(status='no features_only', reason=row['reason'])
            out.writerow(rec)


def _rate(n, total): return f'{n}/{total} ({100*n/total:.1f}%)' if total else '0/0'


def summary(rows, results):
    "A Markdown summary: families, pass rates per contender and step, and every failure with its reason"
    swept = [r for r in rows if r['features'] == 'yes']
    lines = [f"timm {_timm_version()}: {len(rows)} modules, {len(swept)} with a model that builds with "
             f"`features_only=True`.", '', '| contender | U-Net passes | build | forward (native) | odd size | train step | n_in=1 |',
             '|---|---|---|---|---|---|---|']
    for contender, recs in results.items():
        got = [recs.get(r['model'], {}) for r in swept]
        cells = [_rate(sum(g.get('status') == 'pass' for g in got), len(swept))]
        for step in FASTAI_STEPS:
            known = step in (FASTAI_STEPS if contender == 'fastai_timm' else SMP_STEPS)
            cells.append(_rate(sum(g.get(step) == 'ok' for g in got), len(swept)) if known else '—')
        lines.append(f"| {contender} | " + ' | '.join(cells) + ' |')
    for contender, recs in results.items():
        fails = [(r['module'], r['model'], recs[r['model']]['reason']) for r in swept
                 if r['model'] in recs and recs[r['model']].get('status') != 'pass']
        lines += ['', f'{contender} failures ({len(fails)}):', '']
        if fails: lines += ['| module | model | reason |', '|---|---|---|'] + [f'| {m} | `{n}` | {why[:200]} |' for m, n, why in fails]
    no_feat = [r for r in rows if r['features'] != 'yes']
    if no_feat:
        lines += ['', f'Modules without feature extraction ({len(no_feat)}):', '', '| module | reason |', '|---|---|']
        lines += [f"| {r['module']} | {r['reason'][:200]} |" for r in no_feat]
    return '\n'.join(lines)


def _timm_version():
    import timm
    return timm.__version__


def _rows_for(models):
    _offline()
    import timm
    rows = []
    for name in models:
        module = next((m for m in timm.list_modules() if name in timm.list_models(module=m)), '')
        rows.append(dict(module=module, model=name, params_m=round(_meta_params(name)/1e6, 2), features='yes', reason=''))
    return rows


def _rows_from(path):
    "The representatives recorded in an earlier `coverage.csv`, so that a rerun skips choosing them"
    with open(path, newline='') as f: recs = list(csv.DictReader(f))
    return [dict(module=r['module'], model=r['model'], params_m=r['params_m'],
                 features='no' if r['status'] == 'no features_only' else 'yes', reason=r['reason']) for r in recs]


def _merged(out, rows, results):
    "The rows and results of the CSVs under `out`, with those of this run in place of the old ones"
    files = {'fastai_timm': out/'coverage.csv', 'smp': out/'coverage_smp.csv'}
    if not files['fastai_timm'].exists(): return rows, results
    with open(files['fastai_timm'], newline='') as f: old_rows = list(csv.DictReader(f))
    new_rows = {r['model']: r for r in rows}
    merged_rows = [new_rows.get(r['model']) or dict(r, features='no' if r['status'] == 'no features_only' else 'yes')
                   for r in old_rows]
    merged = {}
    for contender, recs in results.items():
        with open(files[contender], newline='') as f: old = {r['model']: r for r in csv.DictReader(f) if r['status']}
        merged[contender] = {**old, **recs}
    return merged_rows, merged


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--models', help='comma-separated timm names to sweep instead of one per module')
    p.add_argument('--modules', help='comma-separated timm modules to choose representatives from (default: all)')
    p.add_argument('--contenders', default='fastai_timm,smp', help='comma-separated: fastai_timm, smp')
    p.add_argument('--timeout', type=float, default=900, help='time limit of one model for one contender, in seconds')
    p.add_argument('--budget', type=float, default=2700, help='time limit of the whole sweep, in seconds')
    p.add_argument('--jobs', type=int, default=1, help='models run at the same time, one process each')
    p.add_argument('--out', type=Path, default=RESULTS, help='folder for coverage.csv and coverage_smp.csv')
    p.add_argument('--select-only', action='store_true', help='print the representatives and stop')
    p.add_argument('--reuse', type=Path, help='take the representatives from the rows of an earlier coverage.csv')
    p.add_argument('--resume', action='store_true',
                   help='keep the rows of the CSVs under --out and run only the models they lack')
    p.add_argument('--update', action='store_true',
                   help='with --models: replace only these rows in the CSVs under --out, keep the others, summarize all')
    args = p.parse_args()

    start = time.perf_counter()
    if args.models: rows = _rows_for(args.models.split(','))
    elif args.reuse: rows = _rows_from(args.reuse)
    else: rows = select(args.modules.split(',') if args.modules else None)
    print(f'chose {len(rows)} models in {time.perf_counter() - start:.0f} s', file=sys.stderr)

    if args.select_only:
        for r in rows: print(r['module'], r['model'], r['params_m'], r['reason'][:100])
        args.out.mkdir(parents=True, exist_ok=True)
        write_csv(args.out/'coverage.csv', FASTAI_COLUMNS, rows, {})
        return

    contenders = args.contenders.split(',')
    unknown = set(contenders) - {'fastai_timm', 'smp'}
    if unknown: p.error(f'unknown contenders {sorted(unknown)}; expected fastai_timm and/or smp')

    _import_all()
    args.out.mkdir(parents=True, exist_ok=True)
    done = _merged(args.out, rows, {c: {} for c in contenders})[1] if args.resume else None

    def save(results):
        "Write both CSVs; with --update, merged into the rows already there. Return what was written"
        written = _merged(args.out, rows, results) if args.update else (rows, results)
        if 'fastai_timm' in results: write_csv(args.out/'coverage.csv', FASTAI_COLUMNS, written[0], written[1]['fastai_timm'])
        if 'smp' in results: write_csv(args.out/'coverage_smp.csv', SMP_COLUMNS, written[0], written[1]['smp'])
        return written

    results = sweep(rows, contenders, args.timeout, args.budget - (time.perf_counter() - start), args.jobs,
                    results=done, save=save)
    rows, results = save(results)
    print(summary(rows, results))
    print(f'\nswept in {time.perf_counter() - start:.0f} s', file=sys.stderr)


if __name__ == '__main__': main()
