"""Evaluate a checkpoint on the test split:  python eval.py ckpt_path=<run>/checkpoints/last.ckpt"""

from vaelab.cli import eval_script

if __name__ == "__main__":
    eval_script()
