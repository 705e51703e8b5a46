"""The VampPrior over a flow posterior: time and memory of a training step, by prior, posterior
and ``prior.components``.

    python benchmarks/vamp_iaf.py                  # the vampprior_mnist experiment's model
    python benchmarks/vamp_iaf.py --steps 5 --components 100

With ``posterior=iaf`` the VampPrior's components q(z|u_k) are IAF densities, and the density
of a z the flow did not sample runs the flow's inverse: sequential over the latent dimensions,
for every pair of a z in the batch and a pseudo-input. ``prior.components=base`` mixes the
flow's base Gaussians q0(z|u_k) instead. This script times one training step (the ELBO's
forward and backward and an Adam update, the median of ``--steps`` after one warm-up step) for:

  standard + gaussian, vamp + gaussian, standard + iaf, vamp + iaf (components=posterior,
  the default), vamp + iaf (components=base)

on the ``experiment=vampprior_mnist`` model (784-300-300-40 MLPs, batch 100, K = 500
pseudo-inputs; IAF with posterior/iaf.yaml's defaults) built from vaelab's own config, on
random binary images of MNIST's shape (the time does not depend on the data). Each runs in its
own process, so that its peak RSS is its own. Quote ratios from one run: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CASES = (
    ("standard", "gaussian", None),
    ("vamp", "gaussian", None),
    ("standard", "iaf", None),
    ("vamp", "iaf", "posterior"),
    ("vamp", "iaf", "base"),
)


def child(prior: str, posterior: str, components: str | None, steps: int, num_components: int) -> dict:
    import torch
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from vaelab.build import build_vae, keep_freed_memory
    from vaelab.objectives import ELBO

    keep_freed_memory("tuned")  # as train.py does
    overrides = ["experiment=vampprior_mnist", f"prior={prior}", f"posterior={posterior}"]
    if prior == "vamp":
        overrides.append(f"prior.num_components={num_components}")
    if components:
        overrides.append(f"prior.components={components}")
    with initialize_config_module(config_module="vaelab.conf", version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "paths.output_dir=/tmp/vamp_iaf", "paths.data_dir=/tmp"])
    config = {k: OmegaConf.to_container(cfg[k], resolve=True)
              for k in ("encoder", "decoder", "posterior", "likelihood", "prior", "data")}
    config["latent_dim"] = int(cfg.latent_dim)
    torch.manual_seed(0)
    shape = (1, 28, 28)
    vae = build_vae(config, shape)
    objective = ELBO()
    optimizer = torch.optim.Adam(vae.parameters(), lr=5e-4)
    x = torch.bernoulli(torch.rand(int(config["data"]["batch_size"]), *shape))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        out = objective(vae, x)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    ms = statistics.median(times[1:]) * 1e3
    return {"ms": ms, "images_per_s": x.shape[0] / ms * 1e3, "elbo": float(out.terms["elbo"].mean()),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case, after one warm-up step")
    parser.add_argument("--components", type=int, default=500, help="K, the VampPrior's pseudo-inputs")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        prior, posterior, components = args.child
        result = child(prior, posterior, None if components == "-" else components, args.steps, args.components)
        print(json.dumps(result))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); experiment=vampprior_mnist's model "
          f"(784-300-300-40, batch 100), K = {args.components}; median of {args.steps} step(s) after one warm-up\n")
    rows = []
    for prior, posterior, components in CASES:
        cmd = [sys.executable, __file__, "--steps", str(args.steps), "--components", str(args.components),
               "--child", prior, posterior, components or "-"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"{prior} + {posterior} failed:\n{proc.stderr[-3000:]}")
        rows.append(((prior, posterior, components), json.loads(proc.stdout.strip().splitlines()[-1])))
    base_ms = rows[0][1]["ms"]
    print("| prior | posterior | prior.components | ms/step | images/s | × standard+gaussian | peak RSS (MiB) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for (prior, posterior, components), r in rows:
        print(f"| {prior} | {posterior} | {components or ''} | {r['ms']:.1f} | {r['images_per_s']:.0f} | "
              f"{r['ms'] / base_ms:.1f} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
