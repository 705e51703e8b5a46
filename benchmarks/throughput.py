"""Training throughput: vaelab (through train.py, as users run it) against a plain PyTorch loop
(the floor for framework overhead) and pythae's trainer, on the same models and data.

    python benchmarks/throughput.py                    # both models, CPU
    python benchmarks/throughput.py --model mlp --epochs 3 --device cuda

Models:
  mlp   784-512-512-32 VAE, Bernoulli likelihood, statically binarized MNIST, batch 128
  conv  conv VAE (channels 32-64-128) on 32×32 images (MNIST zero-padded to 32×32), Gaussian
        likelihood with fixed σ, batch 128

Contenders:
  vaelab          train.py as users run it: W&B (offline) logging, checkpoints, pictures; on
                  a GPU the training step replayed as CUDA graphs (model.cuda_graph=auto)
  plain           a hand-written loop with the same kernels as vaelab's defaults (fused Adam,
                  channels-last convolutions, vaelab's CPU BCE): the floor for framework overhead.
                  On a CPU its run also counts the step's FLOPs per image and times the CPU's
                  float32 matrix products, so the table gives every contender's arithmetic rate
                  and its fraction of that peak (on a GPU plain-graph does this)
  plain-defaults  the same loop with torch's defaults (Adam's per-tensor loop, NCHW
                  convolutions, torch's BCE): what a loop written without tuning gets
  pythae          pythae's BaseTrainer (its own Adam) on the same network modules

Not in the default list:
  plain-sync       the plain loop, reading on the host whether each step's loss is finite (as
                   vaelab's NaN guard does): what one host-device sync a step costs
GPU only (``--device cuda``):
  plain-graph      the plain step captured once as a CUDA graph and replayed: no Python between
                   kernels, the device's own limit for this model at batch 128. Its run also
                   counts the step's FLOPs per image and measures the device's float32
                   matrix-product rate, so the table gives every contender's arithmetic rate
                   and its fraction of that peak
  vaelab-eager     train.py with model.cuda_graph=false: the training step launched operation
                   by operation (the default, auto, replays it as two CUDA graphs on one GPU)
  vaelab-compile   train.py with model.compile=true
  vaelab-compile-graphs  train.py with model.compile=true model.compile_mode=reduce-overhead
                   (only the networks' forward and backward replayed as CUDA graphs)
  vaelab-hostdata  train.py with data.on_device=false (batches copied from host memory)

Each contender runs in its own process with the same thread count, ``--repeats`` times, the
order reversed on every other round so that a slow spell of a shared machine hits all of them.
Images/s of one run are the mean over the training batches of each epoch after the first
(warm-up) epoch; validation and testing are excluded. The table gives the median over the
repeats and the range; the ratios are of the medians. Peak memory is the process's peak
resident set size (and peak CUDA memory on a GPU). pythae is installed in its own package
folder (``--pythae-dir``, made by benchmarks/setup_pythae.sh), layered on this environment's
torch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PYTHAE_DIR = Path.home() / ".cache" / "vaelab" / "bench-pythae-0.1.2"
BATCH = 128
LATENT = 32
TRAIN_IMAGES = 50_000  # both models train on 50,000 images an epoch


# --- data, the same tensors for every contender ------------------------------------------
def load_data(model: str, data_root: Path):
    """float32 tensor [N, 1, H, W] in [0, 1]: binary 28×28 (mlp) or padded 32×32 (conv)."""
    import torch

    from vaelab.datamodules import MNIST, BinarizedMNIST

    # importing vaelab imported Lightning, which sets PYTORCH_NVML_BASED_CUDA_CHECK=1 and with
    # it a failed NVML probe in every Adam step on a CPU machine (vaelab.build.
    # skip_failing_nvml_probe); the plain loop and pythae never import Lightning: torch's default
    os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
    if model == "mlp":
        dm = BinarizedMNIST(root=data_root, download=False)
    else:
        # download=True: torchvision unpacks the .gz files it finds (checking their md5) and fetches
        # nothing; with download=False it needs them unpacked already (as a vaelab run leaves them)
        # the 50,000 training images of vaelab's data=mnist (10,000 held out for validation)
        dm = MNIST(root=data_root, download=True, binarize="none", pad=2, val_size=10_000)
    dm.setup("fit")
    return dm.to_float(dm.train_set.images).contiguous(), torch.tensor(dm.data_shape)


def vaelab_overrides(model: str) -> list[str]:
    common = [f"latent_dim={LATENT}", f"data.batch_size={BATCH}", "optim.optimizer.lr=1e-3"]
    if model == "mlp":
        return common + ["data=binarized_mnist", "encoder=mlp", "decoder=mlp", "encoder.hidden=[512,512]",
                         "decoder.hidden=[512,512]", "likelihood=bernoulli"]
    return common + ["data=mnist", "data.pad=2", "data.binarize=none", "encoder=conv", "decoder=conv",
                     "encoder.channels=[32,64,128]", "decoder.channels=[128,64,32]",
                     "likelihood=gaussian", "likelihood.sigma=1.0"]


# --- the plain loop: the floor --------------------------------------------------------------
def plain_model(model: str, shape: tuple[int, ...], device: str, tuned: bool = True,
                hidden: list[int] | None = None, latent: int = LATENT):
    """The plain loop's encoder, decoder and optimizer. ``tuned``: vaelab's default kernels
    (fused Adam, channels-last convolutions); otherwise torch's defaults. ``hidden`` and
    ``latent`` size the MLP (benchmarks/overhead.py shrinks it)."""
    import torch

    from vaelab.networks import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder

    if model == "mlp":
        hidden = hidden or [512, 512]
        enc, dec = MLPEncoder(shape, 2 * latent, hidden=hidden), MLPDecoder(latent, shape, shape[0], hidden=hidden)
    else:
        enc = ConvEncoder(shape, 2 * latent, channels=[32, 64, 128], channels_last=tuned)
        dec = ConvDecoder(latent, shape, shape[0], channels=[128, 64, 32], channels_last=tuned)
    enc, dec = enc.to(device), dec.to(device)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3, **({"fused": True} if tuned else {}))
    return enc, dec, opt


def plain_loss(model: str, enc, dec, x, tuned: bool = True):
    """−ELBO with the ELBO written out by hand (Bernoulli for the MLP, Gaussian with σ = 1 for
    the conv model, standard normal prior), averaged over the batch. ``tuned``: the Bernoulli
    term through vaelab's BCE kernel (on a CPU without torch's unvectorized log1p), else
    torch's."""
    import math
    from functools import partial

    import torch
    import torch.nn.functional as F

    from vaelab.likelihoods import binary_cross_entropy_with_logits

    mu, raw = enc(x).chunk(2, dim=-1)
    sigma = F.softplus(raw) + 1e-4
    z = mu + sigma * torch.randn_like(mu)
    out = dec(z)
    if model == "mlp":
        bce = binary_cross_entropy_with_logits if tuned else partial(F.binary_cross_entropy_with_logits, reduction="none")
        recon = -bce(out, x).flatten(1).sum(1)
    else:
        recon = (-0.5 * (x - out) ** 2 - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    kl = 0.5 * (sigma**2 + mu**2 - 1 - 2 * torch.log(sigma)).sum(1)
    return -(recon - kl).mean()


def plain_step(model: str, enc, dec, opt, x, check: bool = False, tuned: bool = True) -> None:
    """One training step of the plain loop on the batch ``x``; ``check``: read on the host
    whether the loss is finite before the backward pass (a host-device sync a step)."""
    loss = plain_loss(model, enc, dec, x, tuned)
    if check:
        import torch

        if not bool(torch.isfinite(loss.detach())):
            raise FloatingPointError("non-finite loss")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def plain_lightning_module(model: str, enc, dec, opt, manual: bool = False):
    """A LightningModule whose ``training_step`` is the plain loop's loss on these networks and
    optimizer: Lightning's own loop around the plain step (paired.py's floor, overhead.py's
    ``lightning`` row). ``manual``: manual optimization, one optimizer step per ``BATCH``
    examples of each batch it is given (amortize.py's k steps per Lightning step)."""
    import lightning.pytorch as pl

    class PlainStep(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.enc, self.dec, self.opt = enc, dec, opt
            self.automatic_optimization = not manual

        def training_step(self, batch, batch_idx):
            if self.automatic_optimization:
                return plain_loss(model, self.enc, self.dec, batch[0])
            optimizer = self.optimizers()
            for chunk in batch[0].split(BATCH):
                loss = plain_loss(model, self.enc, self.dec, chunk)
                optimizer.zero_grad(set_to_none=True)
                self.manual_backward(loss)
                optimizer.step()
            return None

        def configure_optimizers(self):
            return self.opt

    return PlainStep()


def run_plain(model: str, epochs: int, device: str, data_root: Path, tuned: bool = True, check: bool = False) -> dict:
    """The floor: the data as one tensor on the device, batches sliced from a permutation, the
    ELBO written out by hand (``plain_step``)."""
    import torch

    x_all, shape = load_data(model, data_root)
    x_all = x_all.to(device)
    enc, dec, opt = plain_model(model, tuple(shape.tolist()), device, tuned)
    rates = []
    n = len(x_all)
    for _ in range(epochs):
        perm = torch.randperm(n, device=device)
        sync(device)
        start = time.perf_counter()
        for i in range(0, n, BATCH):
            plain_step(model, enc, dec, opt, x_all.index_select(0, perm[i : i + BATCH]), check, tuned)
        sync(device)
        rates.append(n / (time.perf_counter() - start))
    result = finish(rates, device)
    if device == "cpu" and tuned and not check:
        # on a CPU the plain loop is the reference of the arithmetic table (a GPU has plain-graph)
        result.update(arithmetic(model, enc, dec, x_all[:BATCH], device))
    return result


def arithmetic(model: str, enc, dec, x, device: str) -> dict:
    """The step's floating-point operations per image (matrix products and convolutions,
    forward and backward, counted by torch's FlopCounterMode) and the device's float32
    matrix-product rate (square products, timed after a warm-up), against which the table
    reports each contender's arithmetic rate."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        plain_loss(model, enc, dec, x).backward()
    for p in (*enc.parameters(), *dec.parameters()):
        p.grad = None
    side = 8192 if device.startswith("cuda") else 2048  # ~1 s on this project's 2-core CPU
    a, b = torch.randn(side, side, device=device), torch.randn(side, side, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return {"flops_per_image": counter.get_total_flops() / len(x),
            "matmul_tflops": 10 * 2 * side**3 / (time.perf_counter() - start) / 1e12,
            "matmul_precision": torch.get_float32_matmul_precision()}


def run_plain_graph(model: str, epochs: int, device: str, data_root: Path) -> dict:
    """The device's own limit for this model at this batch size: the plain step (forward,
    backward, fused Adam) captured once as a CUDA graph and replayed, so no Python runs between
    its kernels. Also counts the step's floating-point operations per image (matrix products
    and convolutions, forward and backward) and measures the device's float32 matrix-product
    rate, against which the table reports each contender's arithmetic rate."""
    import torch

    if not device.startswith("cuda"):
        raise SystemExit("plain-graph replays a CUDA graph: it needs --device cuda")
    x_all, shape = load_data(model, data_root)
    x_all = x_all.to(device)
    enc, dec, _ = plain_model(model, tuple(shape.tolist()), device)
    params = [*enc.parameters(), *dec.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3, fused=True, capturable=True)
    static_x = x_all[:BATCH].clone()
    counted = arithmetic(model, enc, dec, static_x, device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, as torch's docs capture a step
        for _ in range(3):
            plain_step(model, enc, dec, opt, static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss = plain_loss(model, enc, dec, static_x)
        loss.backward()
        opt.step()
    rates, n = [], len(x_all) - len(x_all) % BATCH
    for _ in range(epochs):
        perm = torch.randperm(len(x_all), device=device)
        sync(device)
        start = time.perf_counter()
        for i in range(0, n, BATCH):
            torch.index_select(x_all, 0, perm[i : i + BATCH], out=static_x)
            graph.replay()
        sync(device)
        rates.append(n / (time.perf_counter() - start))
    if not torch.isfinite(loss):
        raise RuntimeError(f"the captured step's loss is {loss.item()}")
    return {**finish(rates, device), **counted}


# --- vaelab through train.py --------------------------------------------------------------------
#: vaelab contenders: train.py with these overrides on top of the benchmark's
VAELAB_VARIANTS = {
    "vaelab": [],
    "vaelab-compile": ["model.compile=true"],          # torch.compile'd encoder and decoder
    "vaelab-compile-graphs": ["model.compile=true", "model.compile_mode=reduce-overhead"],  # ... as CUDA graphs
    "vaelab-eager": ["model.cuda_graph=false"],        # on a GPU: the step launched op by op, no graphs
    "vaelab-hostdata": ["data.on_device=false"],       # batches copied from host memory each step
    "vaelab-log10": ["trainer.log_every_n_steps=10"],  # step values 5x as often as the default (50)
    "vaelab-nolog": ["logger=none"],                   # no W&B (checkpoints, pictures, progress as usual)
}


def vaelab_command(model: str, epochs: int, device: str, data_root: Path, out: Path,
                   variant: str = "vaelab") -> list[str]:
    """``python train.py ...`` for the benchmark's model, as users run it (no test split)."""
    accel = "gpu" if device.startswith("cuda") else "cpu"
    extra = os.environ.get("VAELAB_BENCH_OVERRIDES", "").split()  # --vaelab-overrides
    return [sys.executable, str(REPO / "train.py"), *vaelab_overrides(model), *VAELAB_VARIANTS[variant], *extra,
            f"data.root={data_root}", f"trainer.max_epochs={epochs}", f"trainer.accelerator={accel}",
            "test=false", f"hydra.run.dir={out}"]


def run_vaelab_with_callback(model: str, epochs: int, device: str, data_root: Path, out: Path, target: str,
                             settings: dict[str, object]) -> None:
    """``train.py`` for the benchmark's model, as users run it, with one more callback:
    ``target`` (``module.Class`` of a module in benchmarks/) built with ``settings``; exits
    with the run's error output if it fails (paired.py, logging_cost.py)."""
    module = target.rsplit(".", 1)[0]
    cmd = [*vaelab_command(model, epochs, device, data_root, out), f"+callbacks.bench._target_={target}",
           *(f"+callbacks.bench.{key}={value}" for key, value in settings.items()), f"allowed_targets=[{module}.]"]
    env = {**os.environ, "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"vaelab run failed:\n{proc.stderr[-3000:]}")


def run_vaelab(model: str, epochs: int, device: str, data_root: Path, out: Path, variant: str = "vaelab") -> dict:
    cmd = vaelab_command(model, epochs, device, data_root, out, variant)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    if proc.returncode != 0:
        raise RuntimeError(f"vaelab run failed:\n{proc.stderr[-3000:]}")
    figures = json.loads((out / "throughput.json").read_text())
    result = {"images_per_sec": [e["images_per_sec"] for e in figures["epochs"]], "peak_rss_mib": figures["peak_rss_mib"]}
    if "peak_cuda_mib" in figures:
        result["peak_cuda_mib"] = figures["peak_cuda_mib"]
    return result


# --- pythae's trainer ---------------------------------------------------------------------------
def run_pythae(model: str, epochs: int, device: str, data_root: Path, out: Path) -> dict:
    import torch
    from pythae.data.datasets import BaseDataset
    from pythae.models import VAE, VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder
    from pythae.trainers import BaseTrainer, BaseTrainerConfig
    from pythae.trainers.training_callbacks import TrainingCallback

    from vaelab.networks import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder

    x_all, shape = load_data(model, data_root)
    shape = tuple(shape.tolist())

    class Encoder(BaseEncoder):  # the same network; pythae wants log-variances
        def __init__(self):
            super().__init__()
            self.net = (MLPEncoder(shape, 2 * LATENT, hidden=[512, 512]) if model == "mlp"
                        else ConvEncoder(shape, 2 * LATENT, channels=[32, 64, 128]))

        def forward(self, x):
            mu, raw = self.net(x).chunk(2, dim=-1)
            sigma = torch.nn.functional.softplus(raw) + 1e-4
            return ModelOutput(embedding=mu, log_covariance=2 * torch.log(sigma))

    class Decoder(BaseDecoder):
        def __init__(self):
            super().__init__()
            self.net = (MLPDecoder(LATENT, shape, shape[0], hidden=[512, 512]) if model == "mlp"
                        else ConvDecoder(LATENT, shape, shape[0], channels=[128, 64, 32]))

        def forward(self, z):
            out = self.net(z)
            return ModelOutput(reconstruction=torch.sigmoid(out) if model == "mlp" else out)

    class Timer(TrainingCallback):
        def __init__(self):
            self.rates, self.start, self.last = [], 0.0, 0.0

        def on_train_step_begin(self, training_config, **kwargs):
            sync(device)
            self.start = time.perf_counter()

        def on_train_step_end(self, training_config, **kwargs):
            self.last = time.perf_counter()

        def on_epoch_end(self, training_config, **kwargs):
            self.rates.append(len(x_all) / (self.last - self.start))

    cfg = VAEConfig(input_dim=shape, latent_dim=LATENT, reconstruction_loss="bce" if model == "mlp" else "mse")
    vae = VAE(cfg, encoder=Encoder(), decoder=Decoder())
    tcfg = BaseTrainerConfig(output_dir=str(out), num_epochs=epochs, per_device_train_batch_size=BATCH,
                             learning_rate=1e-3, steps_saving=None, no_cuda=not device.startswith("cuda"))
    timer = Timer()
    dataset = BaseDataset(x_all, torch.zeros(len(x_all)))  # what pythae's pipeline makes of a tensor
    BaseTrainer(vae, train_dataset=dataset, training_config=tcfg, callbacks=[timer]).train()
    return finish(timer.rates, device)


# --- plumbing -------------------------------------------------------------------------------------
def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def finish(rates: list[float], device: str) -> dict:
    import torch

    out = {"images_per_sec": rates, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.startswith("cuda"):
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def child(args: argparse.Namespace) -> None:
    import torch

    from vaelab.build import keep_freed_memory

    keep_freed_memory(args.malloc)  # the same allocator for every contender (train.py: malloc=...)
    torch.manual_seed(0)
    out = Path(args.out)
    runner = {"plain": run_plain, "plain-defaults": lambda *a, **k: run_plain(*a, tuned=False, **k),
              "plain-sync": lambda *a, **k: run_plain(*a, check=True, **k),
              "plain-graph": run_plain_graph, "pythae": run_pythae,
              **{v: lambda *a, v=v, **k: run_vaelab(*a, variant=v, **k) for v in VAELAB_VARIANTS}}[args.contender]
    extra = {} if args.contender.startswith("plain") else {"out": out / "run"}
    result = runner(args.model, args.epochs, args.device, Path(args.data_root), **extra)
    (out / "result.json").write_text(json.dumps(result))


def prepare_root(tmp: Path, shared: Path = SHARED) -> Path:
    """A writable data root with MNIST and BinarizedMNIST from ../shared/data (or ``shared``)."""
    root = tmp / "data"
    for name in ("MNIST", "BinarizedMNIST"):
        src = shared / name
        if not src.is_dir():
            sys.exit(f"{src} is missing: the benchmark reads the real data sets from {shared} (--shared)")
        shutil.copytree(src, root / name)
    return root


def add_child_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark script shares: pythae's folder, and the hidden ones by which
    the script runs each contender in a child process of its own."""
    parser.add_argument("--pythae-dir", default=str(PYTHAE_DIR))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--data-root", help=argparse.SUPPRESS)


def available(contenders: list[str], pythae_dir: str) -> list[str]:
    """``contenders`` without pythae where its folder does not hold it, said once with the fix
    (each of its runs printed an import traceback, and the table had no pythae row)."""
    if "pythae" in contenders and not (Path(pythae_dir) / "pythae" / "__init__.py").is_file():
        others = ",".join(c for c in contenders if c != "pythae")
        print(f"pythae is not installed in {pythae_dir} (--pythae-dir): install it there with "
              "bash benchmarks/setup_pythae.sh (needs network), or leave it out "
              f"(--contenders {others}); going on without it", file=sys.stderr, flush=True)
        return [c for c in contenders if c != "pythae"]
    return contenders


def run_child(cmd: list[str], contender: str, pythae_dir: str) -> subprocess.CompletedProcess:
    """One contender in its own process; pythae's folder on the path for pythae only."""
    env = dict(os.environ)
    if contender == "pythae":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythae_dir, env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
    return proc


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "conv", "both"], default="both")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per contender, interleaved")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--contenders", default="vaelab,plain,plain-defaults,pythae")
    parser.add_argument("--shared", default=str(SHARED), help="the folder that holds MNIST/ and BinarizedMNIST/")
    parser.add_argument("--vaelab-overrides", default="", help="more train.py overrides for every vaelab run, "
                        "space-separated (e.g. 'logger=none')")
    parser.add_argument("--malloc", choices=["tuned", "system"], default="tuned",
                        help="glibc's allocator for every contender: tuned (vaelab's default: freed memory is "
                        "kept for reuse, vaelab.build.keep_freed_memory) or system (glibc's defaults)")
    add_child_arguments(parser)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    os.environ["VAELAB_BENCH_OVERRIDES"] = f"malloc={args.malloc} {args.vaelab_overrides}".strip()
    models = ["mlp", "conv"] if args.model == "both" else [args.model]
    contenders = available(args.contenders.split(","), args.pythae_dir)
    runs: dict[tuple[str, str], list[dict]] = {}
    load_before = os.getloadavg()
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = prepare_root(tmp, Path(args.shared))
        for model in models:
            for rep in range(args.repeats):
                for contender in contenders if rep % 2 == 0 else contenders[::-1]:
                    out = tmp / f"{model}-{contender}-{rep}"
                    out.mkdir()
                    cmd = [sys.executable, __file__, "--child", "--contender", contender, "--model", model,
                           "--epochs", str(args.epochs), "--device", args.device, "--out", str(out),
                           "--data-root", str(root), "--malloc", args.malloc]
                    print(f"[{time.time() - started:6.0f} s] {model} / {contender} (round {rep + 1} of "
                          f"{args.repeats}) ...", file=sys.stderr, flush=True)
                    if run_child(cmd, contender, args.pythae_dir).returncode != 0:
                        continue
                    result = {**json.loads((out / "result.json").read_text()), "round": rep}
                    runs.setdefault((model, contender), []).append(result)
                    # at once, so that a run cut short still leaves its figures behind
                    print(f"    {model} / {contender}: images/s by epoch "
                          f"{', '.join(f'{r:,.0f}' for r in result['images_per_sec'])}", file=sys.stderr, flush=True)

    import torch

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; load average "
          f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(f"{args.repeats} interleaved runs per contender, {args.epochs} epochs each (the first is warm-up); "
          f"allocator: {args.malloc}\n")
    print("| model | contender | images/s (median) | range | epoch s | peak RSS MiB | peak GPU MiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    summary: dict[tuple[str, str], float] = {}
    by_round: dict[tuple[str, str], dict[int, float]] = {}
    for (model, contender), results in runs.items():
        by_round[(model, contender)] = {r["round"]: run_rate(r) for r in results}
        rates = list(by_round[(model, contender)].values())
        rate = median(rates)
        summary[(model, contender)] = rate
        rss = max(r["peak_rss_mib"] for r in results)
        gpu = f"{max(r['peak_cuda_mib'] for r in results):.0f}" if "peak_cuda_mib" in results[0] else "-"
        print(f"| {model} | {contender} | {rate:,.0f} | {min(rates):,.0f}–{max(rates):,.0f} | "
              f"{TRAIN_IMAGES / rate:.1f} | {rss:.0f} | {gpu} |")
    print()
    for model in models:
        for mine in (c for c in contenders if c.startswith("vaelab")):
            v = summary.get((model, mine))
            for other in contenders:
                o = summary.get((model, other))
                if not other.startswith("vaelab") and v and o:
                    # each round runs the contenders back to back (in turn forwards and backwards), so
                    # a round's ratio is the least exposed to the host's speed drifting between rounds
                    mine_r, other_r = by_round[(model, mine)], by_round[(model, other)]
                    rounds = [mine_r[k] / other_r[k] for k in sorted(mine_r.keys() & other_r.keys())]
                    per_round = (f"; by round {', '.join(f'{r:.3f}' for r in rounds)} (median {median(rounds):.3f})"
                                 if len(rounds) > 1 else "")
                    print(f"{model}: {mine} / {other} = {v / o:.3f}{per_round}")
    print_device_limits(models, contenders, runs, summary)


def run_rate(result: dict) -> float:
    """A run's images/s: the mean over its epochs after the first (warm-up)."""
    per_epoch = result["images_per_sec"][1:] or result["images_per_sec"]
    return sum(per_epoch) / len(per_epoch)


def print_device_limits(models, contenders, runs, summary) -> None:
    """Each contender's arithmetic rate against the measured float32 matrix-product peak and,
    on a GPU, its images/s against the device's limit (the plain step as a CUDA graph). On a
    CPU the plain loop's run counts the FLOPs and measures the peak."""
    for model in models:
        reference = "plain-graph" if runs.get((model, "plain-graph")) else "plain"
        counted = [r for r in runs.get((model, reference), []) if "flops_per_image" in r]
        if not counted:
            continue
        flops = counted[0]["flops_per_image"]
        peak = median([r["matmul_tflops"] for r in counted])
        limit = summary[(model, "plain-graph")] if reference == "plain-graph" else None
        print(f"\n{model}: {flops / 1e6:.1f} MFLOP per image per step (matrix products and convolutions, "
              f"forward and backward); float32 matrix-product peak measured {peak:.3f} TFLOP/s "
              f"(precision {counted[0]['matmul_precision']!r})")
        limit_head, limit_rule = (" of the device limit (plain-graph) |", "---:|") if limit else ("", "")
        print(f"| contender | images/s |{limit_head} TFLOP/s | of the float32 peak |")
        print(f"|---|---:|{limit_rule}---:|---:|")
        for contender in contenders:
            rate = summary.get((model, contender))
            if rate:
                tflops = rate * flops / 1e12
                of_limit = f" {rate / limit:.3f} |" if limit else ""
                print(f"| {contender} | {rate:,.0f} |{of_limit} {tflops:.3f} | {tflops / peak:.3f} |")


if __name__ == "__main__":
    main()
