"""Importance-sampled evaluation on a CPU: time per image, page faults and memory of one
evaluation batch, by the allocator setting and by ``evaluation.pass_size``.

    python benchmarks/evaluation.py                       # both models, K = 10 (validation)
    python benchmarks/evaluation.py --model mlp --samples 100   # one chunk of the test's K = 1000
    python benchmarks/evaluation.py --model conv --pass-sizes none,500,2048,4096
    python benchmarks/evaluation.py --device cuda --pass-sizes none,1024,4096,16384   # a GPU

Validation computes ``val/iwae`` with K = 10 importance samples for every validation image,
the test ``test/nll`` with K = 1000 (in chunks of ``evaluation.chunk_size`` = 100 samples an
example). A batch of 500 images then makes one forward pass of 5,000 (K = 10) or 50,000
(one chunk of K = 1000) samples, whose activations are far larger than a training step's
(the conv model's decoder: 39-625 MiB each at 5,000 samples). This script times one such batch
(the median of ``--repeats`` after one warm-up) for each combination of:

  malloc  ``system``: glibc's defaults; ``mmap>=32MiB``: vaelab's setting until this script
          was written (blocks of 32 MiB and more still mapped afresh, and faulted in, every
          time); ``tuned``: ``vaelab.build.keep_freed_memory`` as it is now (no block mapped
          on its own: every block from the heap, reused)
  pass    ``none``: the whole batch in one pass (a batch × chunk_size samples); N: at most N
          samples a forward pass (``evaluation.pass_size``; auto is
          ``vaelab.module.CPU_PASS_SIZE`` on a CPU)

Each combination runs in its own process (an allocator setting cannot be undone), on random
data of the model's shape with the benchmark models' untrained networks (the time does not
depend on the weights). Page faults are the process's minor faults during one batch; peak
RSS is the process's. With ``--device cuda`` the models and data are on the GPU, each batch
is timed to the device's end, and the table adds the batch's peak GPU memory (the allocator
setting then only concerns host memory: ``tuned`` alone by default). Quote ratios from one
run: the machine is shared.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import statistics
import subprocess
import sys
import time

MODELS = ("mlp", "conv")
MALLOC = ("system", "mmap>=32MiB", "tuned")


def child(model: str, k: int, batch: int, malloc: str, pass_size: int | None, repeats: int,
          device: str = "cpu") -> dict:
    import torch
    from throughput import LATENT, plain_model

    from vaelab.build import keep_freed_memory
    from vaelab.likelihoods import Bernoulli, Gaussian
    from vaelab.module import DEFAULT_EVALUATION
    from vaelab.posteriors import DiagonalGaussian
    from vaelab.priors import StandardNormal
    from vaelab.vae import VAE

    if malloc == "tuned":
        keep_freed_memory("tuned")
    elif malloc == "mmap>=32MiB":  # the setting before M_MMAP_MAX: threshold at glibc's highest
        mallopt = ctypes.CDLL("libc.so.6").mallopt
        mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    torch.manual_seed(0)
    shape = (1, 32, 32) if model == "conv" else (1, 28, 28)
    enc, dec, _ = plain_model(model, shape, device)  # throughput.py's networks for this model
    x = torch.rand(batch, *shape, device=device)
    if model == "conv":  # a Gaussian with σ = 1, as throughput.py's conv model
        lik = Gaussian(sigma=1.0)
    else:  # binary images and a Bernoulli, as its MLP model
        lik, x = Bernoulli(), torch.bernoulli(x)
    vae = VAE(enc, DiagonalGaussian(), dec, lik, StandardNormal(LATENT)).eval()
    cuda = x.device.type == "cuda"
    chunk = min(DEFAULT_EVALUATION["chunk_size"], k)  # evaluation.chunk_size's default
    times, faults = [], []
    for _ in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize(x.device)
            torch.cuda.reset_peak_memory_stats(x.device)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        vae.log_likelihood(x, num_samples=k, chunk_size=chunk, pass_size=pass_size)
        if cuda:
            torch.cuda.synchronize(x.device)
        times.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    result = {"ms_per_image": 1e3 * statistics.median(times[1:]) / batch, "faults": statistics.median(faults[1:]),
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if cuda:
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated(x.device) / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp,conv", help="mlp, conv or both (comma-separated)")
    parser.add_argument("--samples", default="10", help="K per image: 10 (validation), 100 (one test chunk)")
    parser.add_argument("--batch", type=int, default=500, help="images a batch (data.eval_batch_size)")
    parser.add_argument("--pass-sizes", default="none,1024", help="samples a forward pass; none: unbounded")
    parser.add_argument("--malloc", default=None, help=f"comma-separated, of {', '.join(MALLOC)} "
                        "(default: all on a CPU, tuned on a GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(**json.loads(args.child))))
        return

    cuda = args.device.startswith("cuda")
    mallocs = (args.malloc or ("tuned" if cuda else ",".join(MALLOC))).split(",")
    rows = []
    for model in args.model.split(","):
        for k in (int(v) for v in args.samples.split(",")):
            for pass_name in args.pass_sizes.split(","):
                pass_size = None if pass_name == "none" else int(pass_name)
                if model == "conv" and k * args.batch > 10_000 and pass_size is None and not cuda:
                    print(f"[skip] conv, K={k}, one pass of {k * args.batch:,} samples: tens of GB", file=sys.stderr)
                    continue
                for malloc in mallocs:
                    spec = {"model": model, "k": k, "batch": args.batch, "malloc": malloc, "pass_size": pass_size,
                            "repeats": args.repeats, "device": args.device}
                    print(f"[{time.strftime('%H:%M:%S')}] {spec}", file=sys.stderr, flush=True)
                    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                          capture_output=True, text=True)
                    if proc.returncode != 0:
                        raise RuntimeError(proc.stderr[-3000:])
                    rows.append((spec, json.loads(proc.stdout.strip().splitlines()[-1])))

    print(f"\none batch of {args.batch} images, importance-sampled log p(x) on {args.device}; median of "
          f"{args.repeats} after a warm-up; torch threads: the default\n")
    gpu_head, gpu_rule = (" peak GPU MiB |", "---:|") if cuda else ("", "")
    print(f"| model | K | pass | malloc | ms / image | page faults / batch | peak RSS MiB |{gpu_head}")
    print(f"|---|---:|---:|---|---:|---:|---:|{gpu_rule}")
    for spec, r in rows:
        pass_name = "none" if spec["pass_size"] is None else f"{spec['pass_size']:,}"
        gpu = f" {r['peak_gpu_mib']:,.0f} |" if cuda else ""
        print(f"| {spec['model']} | {spec['k']} | {pass_name} | {spec['malloc']} | {r['ms_per_image']:.3f} | "
              f"{r['faults']:,.0f} | {r['peak_rss_mib']:,.0f} |{gpu}")
    print()
    for model in args.model.split(","):
        for k in (int(v) for v in args.samples.split(",")):
            base = [r for s, r in rows if s["model"] == model and s["k"] == k and s["malloc"] == MALLOC[1]
                    and s["pass_size"] is None]
            best = [r for s, r in rows if s["model"] == model and s["k"] == k and s["malloc"] == "tuned"
                    and s["pass_size"] is not None]
            if base and best:
                print(f"{model}, K={k}: before (mmap>=32MiB, one pass) / now (tuned, bounded passes) = "
                      f"{base[0]['ms_per_image'] / best[0]['ms_per_image']:.2f}x faster")


if __name__ == "__main__":
    main()
