"""Train a VAE:  python train.py likelihood=gaussian prior=standard   (see README.md)."""

from vaelab.cli import train_script

if __name__ == "__main__":
    train_script()
