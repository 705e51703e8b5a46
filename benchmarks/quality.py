"""Quality at equal budget: test NLL after the same number of epochs, vaelab against pythae,
on the same architecture and data, so that speed is never bought with worse numbers.

    python benchmarks/quality.py                     # 10 epochs, K = 500, CPU
    python benchmarks/quality.py --epochs 50 --num-samples 5000 --device cuda

Model: the 784-512-512-32 MLP VAE of benchmarks/throughput.py (Bernoulli likelihood, diagonal
Gaussian posterior, standard normal prior), Adam with lr 1e-3, batch 128, on statically
binarized MNIST (Larochelle & Murray's fixed 50,000 / 10,000 / 10,000 split) from
../shared/data. Both keep the model of the epoch with the best validation ELBO (vaelab: its
``val/elbo`` checkpoint; pythae: its best eval loss, which is −ELBO) and evaluate it on the
10,000 test images:

* test NLL, −log p(x) by importance sampling with the same K for both (vaelab: ``test/nll``
  of ``train.py``; pythae: ``VAE.get_nll``, the same estimator, log 1/K Σ_k p(x|z_k) p(z_k) /
  q(z_k|x));
* test ELBO (vaelab: ``test/elbo``; pythae: minus its loss, the analytic-KL ELBO, averaged
  over the test set here);
Speed is benchmarks/throughput.py's business; this script compares numbers only.

All numbers are nats per example. pythae is installed in its own package folder (made by
benchmarks/setup_pythae.sh), layered on this environment's torch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import BATCH, LATENT, REPO, add_child_arguments, available, prepare_root, run_child  # noqa: E402


def run_vaelab(args: argparse.Namespace, root: Path, out: Path) -> dict:
    cmd = [sys.executable, str(REPO / "train.py"), "data=binarized_mnist", f"data.root={root}",
           f"data.batch_size={BATCH}", f"latent_dim={LATENT}", "encoder.hidden=[512,512]",
           "decoder.hidden=[512,512]", "likelihood=bernoulli", "optim.optimizer.lr=1e-3",
           f"trainer.max_epochs={args.epochs}", f"trainer.accelerator={'gpu' if args.device.startswith('cuda') else 'cpu'}",
           f"evaluation.test_num_samples={args.num_samples}", f"seed={args.seed}", "logger=csv",
           f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    if proc.returncode != 0:
        raise RuntimeError(f"vaelab run failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"test_nll": summary["test"]["test/nll"], "test_elbo": summary["test"]["test/elbo"]}


def run_pythae(args: argparse.Namespace, root: Path, out: Path) -> dict:
    import torch
    import torch.nn.functional as F
    from pythae.data.datasets import BaseDataset
    from pythae.models import VAE, VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder
    from pythae.trainers import BaseTrainer, BaseTrainerConfig

    from vaelab.datamodules import BinarizedMNIST
    from vaelab.networks import MLPDecoder, MLPEncoder

    dm = BinarizedMNIST(root=root, download=False)
    dm.setup("fit")
    train, valid, test = (dm.to_float(s.images) for s in (dm.train_set, dm.val_set, dm.test_set))
    shape = tuple(train.shape[1:])

    class Encoder(BaseEncoder):  # the network of vaelab's MLP VAE; pythae wants log-variances
        def __init__(self):
            super().__init__()
            self.net = MLPEncoder(shape, 2 * LATENT, hidden=[512, 512])

        def forward(self, x):
            mu, raw = self.net(x).chunk(2, dim=-1)
            sigma = F.softplus(raw) + 1e-4
            return ModelOutput(embedding=mu, log_covariance=2 * torch.log(sigma))

    class Decoder(BaseDecoder):
        def __init__(self):
            super().__init__()
            self.net = MLPDecoder(LATENT, shape, 1, hidden=[512, 512])

        def forward(self, z):
            return ModelOutput(reconstruction=torch.sigmoid(self.net(z)))

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = VAE(VAEConfig(input_dim=shape, latent_dim=LATENT, reconstruction_loss="bce"),
                encoder=Encoder(), decoder=Decoder())
    config = BaseTrainerConfig(output_dir=str(out), num_epochs=args.epochs, per_device_train_batch_size=BATCH,
                               per_device_eval_batch_size=500, learning_rate=1e-3, steps_saving=None,
                               seed=args.seed, no_cuda=not args.device.startswith("cuda"))
    trainer = BaseTrainer(model, train_dataset=BaseDataset(train, torch.zeros(len(train))),
                          eval_dataset=BaseDataset(valid, torch.zeros(len(valid))), training_config=config)
    trainer.train()
    best = trainer._best_model.to(device).eval()
    with torch.no_grad():
        x = test.to(device)
        elbo = -torch.cat([best({"data": x[i : i + 500]}).loss.reshape(1) * len(x[i : i + 500])
                           for i in range(0, len(x), 500)]).sum().item() / len(x)
        nll = -best.get_nll(x, n_samples=args.num_samples, batch_size=min(args.num_samples, 1000))
    return {"test_nll": float(nll), "test_elbo": elbo}


def child(args: argparse.Namespace) -> None:
    out = Path(args.out)
    runner = {"vaelab": run_vaelab, "pythae": run_pythae}[args.contender]
    result = runner(args, Path(args.data_root), out / "run")
    (out / "result.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--num-samples", type=int, default=500, help="K of the importance-sampled test NLL")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--contenders", default="vaelab,pythae")
    add_child_arguments(parser)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    results: dict[str, dict] = {}
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = prepare_root(tmp)
        for contender in available(args.contenders.split(","), args.pythae_dir):
            out = tmp / contender
            out.mkdir()
            print(f"[{time.time() - started:6.0f} s] {contender}: {args.epochs} epochs, then the test NLL "
                  f"with K={args.num_samples} ...", file=sys.stderr, flush=True)
            cmd = [sys.executable, __file__, "--child", "--contender", contender, "--out", str(out),
                   "--data-root", str(root), "--epochs", str(args.epochs), "--num-samples", str(args.num_samples),
                   "--seed", str(args.seed), "--device", args.device]
            if run_child(cmd, contender, args.pythae_dir).returncode != 0:
                continue
            results[contender] = json.loads((out / "result.json").read_text())

    print(f"\nstatically binarized MNIST, 784-512-512-32 MLP VAE, {args.epochs} epochs, batch {BATCH}, "
          f"Adam 1e-3, seed {args.seed}; test NLL by importance sampling with K={args.num_samples}; "
          "nats per example (lower NLL, higher ELBO is better)\n")
    print("| library | test NLL | test ELBO |")
    print("|---|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['test_nll']:.2f} | {r['test_elbo']:.2f} |")
    if {"vaelab", "pythae"} <= results.keys():
        d = results["vaelab"]["test_nll"] - results["pythae"]["test_nll"]
        print(f"\nvaelab − pythae test NLL: {d:+.2f} nats ({'better' if d < 0 else 'worse'} for vaelab)")


if __name__ == "__main__":
    main()
