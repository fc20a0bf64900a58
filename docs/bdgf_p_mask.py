"""Draw docs/bdgf_p_mask.png from the CSV log of a BDGFPretrain run.

    lightning fit --config configs/bdgf_pretrain_synthetic.yaml
    python docs/bdgf_p_mask.py runs/bdgf_pretrain_synthetic/version_0/metrics.csv docs/bdgf_p_mask.png
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def series(rows, key):
    pairs = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def smoothed(values, width=50):
    return np.convolve(values, np.ones(width) / width, mode="valid")


def main(csv_path: str, out_path: str) -> None:
    rows = list(csv.DictReader(open(csv_path)))
    modalities = sorted(k.split("/")[-1] for k in rows[0] if k.startswith("train/p_mask/"))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 5.2), sharex=True)
    for name, colour in zip(modalities, ("tab:blue", "tab:orange", "tab:green")):
        steps, p = series(rows, f"train/p_mask/{name}")
        top.plot(steps, p, color=colour, label=f"p_mask/{name}")
        steps, ema = series(rows, f"train/ema_loss/{name}")
        bottom.plot(steps, ema, color=colour, label=f"{name}: eps loss where visible (EMA)")
        steps, x0 = series(rows, f"train/x0_loss_masked/{name}")
        bottom.plot(steps[49:], smoothed(x0), color=colour, linestyle="--",
                    label=f"{name}: x0 loss where masked (mean of 50)")
    top.set_ylabel("masking probability")
    top.legend(loc="center right")
    top.grid(alpha=0.3)
    bottom.axhline(1.0, color="grey", linewidth=0.8)
    bottom.set_ylabel("loss (1 = predict mean / 0)")
    bottom.set_xlabel("optimiser step")
    bottom.legend(fontsize=7, loc="upper right")
    bottom.grid(alpha=0.3)
    fig.suptitle("BDGF stage 1 on the synthetic HSI + SAR scene (adaptive masking, masked_target x0)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=80)


if __name__ == "__main__":
    main(*sys.argv[1:3])
