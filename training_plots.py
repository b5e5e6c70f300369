"""PNG plots of a training run, redrawn from its log files at each evaluation.

loss.png         train / val loss and HellaSwag accuracy over steps (from log.txt)
expert_load.png  per-layer expert load at the last evaluation, and its imbalance over steps
                 (from expert_load.jsonl)
"""

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display: works on headless nodes

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# OpenAI's GPT-2 124M on build-nanogpt's FineWeb-Edu validation shard, and on HellaSwag (acc_norm).
GPT2_124M_VAL_LOSS = 3.2924
GPT2_124M_HELLASWAG = 0.2955


def read_log(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """log.txt's `<step> <stream> <value>` lines as {stream: (steps, values)}."""
    streams = defaultdict(lambda: ([], []))
    for line in path.read_text().splitlines():
        step, stream, value = line.split()
        streams[stream][0].append(int(step))
        streams[stream][1].append(float(value))
    return streams


def plot_losses(log_file: Path, out_file: Path) -> None:
    streams = read_log(log_file)
    fig, (loss_ax, hella_ax) = plt.subplots(1, 2, figsize=(14, 5))
    for stream, label in (("train", "train loss"), ("val", "val loss")):
        if stream in streams:
            loss_ax.plot(*streams[stream], label=label)
    loss_ax.axhline(GPT2_124M_VAL_LOSS, color="r", linestyle="--", label="OpenAI GPT-2 124M val loss")
    loss_ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", yscale="log", title="Loss")
    loss_ax.legend()
    if "hella" in streams:
        hella_ax.plot(*streams["hella"], label="HellaSwag acc_norm")
    hella_ax.axhline(GPT2_124M_HELLASWAG, color="r", linestyle="--", label="OpenAI GPT-2 124M")
    hella_ax.set(xlabel="step", ylabel="accuracy", title="HellaSwag")
    hella_ax.legend()
    save(fig, out_file)


def plot_expert_load(load_file: Path, out_file: Path) -> None:
    records = [json.loads(line) for line in load_file.read_text().splitlines()]
    last = records[-1]
    layers = [layer["layer"] for layer in last["layers"]]
    fractions = [layer["fractions"] for layer in last["layers"]]  # (MoE layers, experts)
    fig, (heat_ax, ratio_ax) = plt.subplots(1, 2, figsize=(14, 5))
    image = heat_ax.imshow(fractions, aspect="auto", cmap="viridis", vmin=0.0)
    fig.colorbar(image, ax=heat_ax, label="share of top-k assignments")
    heat_ax.set_yticks(range(len(layers)), labels=layers)
    heat_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    heat_ax.set(xlabel="expert", ylabel="layer", title=f"Expert load at step {last['step']}")
    steps = [record["step"] for record in records]
    for i, layer in enumerate(layers):
        ratios = [record["layers"][i]["max_over_mean"] for record in records]
        ratio_ax.plot(steps, ratios, label=f"layer {layer}")
    ratio_ax.axhline(1.0, color="k", linestyle=":", label="perfect balance")
    ratio_ax.set(xlabel="step", ylabel="max / mean expert load", title="Load imbalance")
    ratio_ax.legend(fontsize="small", ncol=2)
    save(fig, out_file)


def save(fig: plt.Figure, out_file: Path) -> None:
    """Write the figure and close it, also when the write fails: pyplot keeps every open figure in memory."""
    fig.tight_layout()
    try:
        fig.savefig(out_file, dpi=100)
    finally:
        plt.close(fig)
