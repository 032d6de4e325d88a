"""The copying task of the RIM paper, as the authors' released script runs it, with the seed table's
baselines (LSTMs, a causal Transformer, a relational memory core).

Setting (``event_based/train_copying.py``, ``copying_data.py`` and ``experiment_copying.sh`` in the
authors' public repository):

- data: 10 symbols from 1-8, ``T - 1`` blanks (0), a marker (9), 10 blanks; the target is blank
  everywhere but the last 10 positions, which repeat the symbols (``T + 20`` positions). Each epoch
  draws 300 fresh batches of 64 and trains on 200 of them picked at random (with replacement).
- model: a 20-token embedding of width ``emsize = nhid`` (U(-0.1, 0.1)), dropout 0.5, the core,
  dropout 0.5, a linear read-out to 20 logits (weights U(-0.1, 0.1), zero bias).
- loss and reported figure: cross-entropy averaged over **every** position (the paper's CE);
  we also report it over the 10 output positions only.
- optimiser: Adam 1e-3, gradient norm clipped at 1.0, 200 epochs of 200 batches (40,000 steps).
  The authors build a ReduceLROnPlateau scheduler but never step it, so their learning rate is
  constant; ``--plateau`` steps one on each epoch's training loss instead.
- the recurrent state is carried (detached) from batch to batch within an epoch, and from zeros at
  each epoch's start, as theirs is; the evaluation carries it too (``--reset-state``: from zeros
  at every batch).

Models (``--models``): ``rims-6-4``, ``rims-6-3``, ``rims-6-2``, ``rims-5-2`` (K RIMs, k active, 600
hidden in all, the package's :class:`RIMCore`), ``lstm-600``, ``lstm-300`` (``nn.LSTM``, the package's
``lstm`` core), ``lstm-600-chrono`` (chrono-initialised gate biases, Tallec & Ollivier 2018: a
labelled extra row), ``transformer`` (causal, 3 layers of width 256, sinusoidal positions) and
``rmc`` (a relational memory core, Santoro et al. 2018: 4 slots of 4 heads x 128).

Runs are resumable: each model x seed keeps ``<out>/runs/<model>_s<seed>.pt`` (model, optimiser,
step, state and curves; written atomically every ``--checkpoint-every`` steps), and a run started
again continues from it (``--steps`` beyond the stored budget extends it). ``--parallel N`` runs N
model x seed tasks at a time on a local Ray (one torch thread each), ``--address`` on a Ray cluster.

    python benchmarks/copying.py --quick                       # every model, 20 steps: about 2 minutes
    python benchmarks/copying.py --models rims-6-4,lstm-600 --seeds 0,1,2 --parallel 2
    python benchmarks/copying.py --seeds 0,1,2 --address auto  # the whole table on a cluster
    python benchmarks/copying.py --seeds 0,1,2 --device cuda --cuda-graphs  # on a GPU, RIM unrolls replayed

``--device cuda`` trains and evaluates on the GPU (a run's checkpoint continues on either device);
``--cuda-graphs`` sets the RIM rows' ``cuda_graphs`` (each unroll recorded once and replayed, the
same numbers; :mod:`rim_agents.cuda_graphs`).

Writes ``<out>/copying.json`` (every run: settings, curves, final CE at every length) and
``<out>/copying.md`` (mean and range over seeds beside the paper's seed table).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rim_agents import RIMCore  # noqa: E402 (after the path line)
from rim_agents.cores import build_core  # noqa: E402
from rim_agents.runs import atomic_write_bytes, atomic_write_text  # noqa: E402

VOCAB, N_SEQ, MARKER, OUT_DIM = 20, 10, 9, 20
RESULTS = ROOT / "benchmarks" / "results" / "copying"
MODELS = (
    "rims-6-4",
    "rims-6-3",
    "rims-6-2",
    "rims-5-2",
    "lstm-600",
    "lstm-300",
    "lstm-600-chrono",
    "transformer",
    "rmc",
)
#: The paper's seed table (test CE at length 200, all positions); the train-length column is 0.00
#: for all but the LSTMs.
PAPER = {"rims-6-4": 0.00, "lstm-600": 3.56, "lstm-300": 4.32, "transformer": 0.54, "rmc": 0.13}
State = Any


# ----------------------------------------------------------------------------------------- data
def copying_data(T: int, n_batches: int, batch_size: int, rng: np.random.Generator) -> tuple[th.Tensor, th.Tensor]:
    """``x, y`` of shape ``(n_batches, T + 20, batch_size)``, as the authors' ``copying_data(T)``."""
    n = n_batches * batch_size
    seq = rng.integers(1, 9, size=(n, N_SEQ))
    x = np.concatenate([seq, np.zeros((n, T - 1)), np.full((n, 1), MARKER), np.zeros((n, N_SEQ))], axis=1)
    y = np.concatenate([np.zeros((n, N_SEQ + T)), seq], axis=1)
    x = x.reshape(n_batches, batch_size, T + 2 * N_SEQ).swapaxes(1, 2)
    y = y.reshape(n_batches, batch_size, T + 2 * N_SEQ).swapaxes(1, 2)
    return th.from_numpy(np.ascontiguousarray(x)).long(), th.from_numpy(np.ascontiguousarray(y)).long()


# --------------------------------------------------------------------------------------- models
class RelationalMemory(nn.Module):
    """A relational memory core (Santoro et al., 2018): ``slots`` memory rows attend over
    themselves and the input (multi-head), pass an MLP (residual, layer norm), and are written
    through LSTM-style input and forget gates. The output is the flattened memory."""

    def __init__(self, input_size: int, slots: int = 4, heads: int = 4, head_size: int = 128) -> None:
        super().__init__()
        self.slots, self.heads, self.head_size = slots, heads, head_size
        d = heads * head_size
        self.d = d
        self.hidden_size = slots * d
        self.input_proj = nn.Linear(input_size, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.gate_input = nn.Linear(d, 2 * d)
        self.gate_memory = nn.Linear(d, 2 * d)
        self.forget_bias, self.input_bias = 1.0, 0.0

    def initial_state(self, batch: int) -> th.Tensor:
        """Identity-like initial memory, as the paper's: row i starts as the i-th unit vector."""
        eye = th.eye(self.slots, self.d)
        return eye.unsqueeze(0).expand(batch, -1, -1).clone()

    def step(self, x: th.Tensor, memory: th.Tensor) -> th.Tensor:
        B = x.shape[0]
        inp = self.input_proj(x).unsqueeze(1)  # (B, 1, d)
        both = th.cat([memory, inp], dim=1)  # (B, slots + 1, d)
        q, k, v = self.qkv(both).chunk(3, dim=-1)
        split = lambda t: t.view(B, -1, self.heads, self.head_size).transpose(1, 2)  # noqa: E731
        att = F.scaled_dot_product_attention(split(q), split(k), split(v))
        att = att.transpose(1, 2).reshape(B, -1, self.d)[:, : self.slots]
        m = self.norm1(memory + att)
        m = self.norm2(m + self.mlp(m))
        gates = self.gate_input(inp) + self.gate_memory(th.tanh(memory))
        i, f = gates.chunk(2, dim=-1)
        return th.sigmoid(i + self.input_bias) * th.tanh(m) + th.sigmoid(f + self.forget_bias) * memory

    def forward(self, x: th.Tensor, memory: th.Tensor | None = None) -> tuple[th.Tensor, th.Tensor]:
        memory = self.initial_state(x.shape[1]).to(x) if memory is None else memory
        outs = []
        for t in range(x.shape[0]):
            memory = self.step(x[t], memory)
            outs.append(memory.reshape(x.shape[1], -1))
        return th.stack(outs), memory


class CausalTransformer(nn.Module):
    """A causal Transformer encoder with sinusoidal positions (it sees the whole prefix; no state)."""

    def __init__(self, input_size: int, d_model: int = 256, layers: int = 3, heads: int = 4) -> None:
        super().__init__()
        self.hidden_size = d_model
        self.input_proj = nn.Linear(input_size, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.1, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: th.Tensor, state: State = None) -> tuple[th.Tensor, State]:
        T = x.shape[0]
        pos = th.arange(T, dtype=th.float32).unsqueeze(1)
        freq = th.exp(th.arange(0, self.hidden_size, 2, dtype=th.float32) * (-math.log(10000.0) / self.hidden_size))
        pe = th.zeros(T, self.hidden_size)
        pe[:, 0::2], pe[:, 1::2] = th.sin(pos * freq), th.cos(pos * freq)
        h = self.input_proj(x) + pe.unsqueeze(1).to(x)
        mask = nn.Transformer.generate_square_subsequent_mask(T).to(x)
        return self.encoder(h, mask=mask, is_causal=True), None


def chrono_init(lstm: nn.LSTM, t_max: int, generator: th.Generator) -> None:
    """Forget-gate biases log(U(1, t_max - 1)), input-gate biases their negatives (gate order i, f, g, o)."""
    H = lstm.hidden_size
    with th.no_grad():
        b_f = th.log(1 + (t_max - 2) * th.rand(H, generator=generator))
        lstm.bias_ih_l0.zero_()
        lstm.bias_hh_l0.zero_()
        lstm.bias_hh_l0[H : 2 * H] = b_f
        lstm.bias_hh_l0[:H] = -b_f


class CopyModel(nn.Module):
    """Embedding, dropout, core, dropout, read-out: the authors' ``RNNModel`` with any core."""

    def __init__(self, name: str, train_len: int, dropout: float = 0.5, cuda_graphs: bool = False) -> None:
        super().__init__()
        self.name = name
        if name.startswith("rims-"):
            K, k = (int(v) for v in name.split("-")[1:])
            width = 600
            self.core: nn.Module = RIMCore(
                width, num_units=K, k_active=k, unit_size=width // K, cell="lstm", cuda_graphs=cuda_graphs
            )
        elif name.startswith("lstm-"):
            width = int(name.split("-")[1])
            self.core = build_core("lstm", width, width, 1, {})
            if name.endswith("-chrono"):
                chrono_init(self.core, train_len + 2 * N_SEQ, th.Generator().manual_seed(th.initial_seed()))
        elif name == "transformer":
            width = 256
            self.core = CausalTransformer(width)
        elif name == "rmc":
            width = 256
            self.core = RelationalMemory(width)
        else:
            raise ValueError(f"unknown model {name!r}: choose from {', '.join(MODELS)}")
        out_width = self.core.hidden_size
        self.encoder = nn.Embedding(VOCAB, width)
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(out_width, OUT_DIM)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, x: th.Tensor, state: State = None) -> tuple[th.Tensor, State]:
        out, state = self.core(self.drop(self.encoder(x)), state)
        return self.decoder(self.drop(out)), state


def detach(state: State) -> State:
    if state is None:
        return None
    if isinstance(state, th.Tensor):
        return state.detach()
    return tuple(s.detach() for s in state)


def losses(logits: th.Tensor, y: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """Cross-entropy over every position and over the 10 output positions."""
    everywhere = F.cross_entropy(logits.reshape(-1, OUT_DIM), y.reshape(-1))
    output = F.cross_entropy(logits[-N_SEQ:].reshape(-1, OUT_DIM), y[-N_SEQ:].reshape(-1))
    return everywhere, output


def evaluate(model: CopyModel, T: int, batches: int, seed: int, reset_state: bool) -> dict[str, float]:
    """Mean CE over ``batches`` fresh batches of 64 at length ``T`` (state carried unless reset)."""
    device = next(model.parameters()).device
    x, y = copying_data(T, batches, 64, np.random.default_rng(seed))
    x, y = x.to(device), y.to(device)
    model.eval()
    totals = np.zeros(2)
    state: State = None
    with th.no_grad():
        for b in range(batches):
            logits, state = model(x[b], None if reset_state else state)
            totals += [float(v) for v in losses(logits, y[b])]
    model.train()
    return {"all_positions": float(totals[0] / batches), "output_phase": float(totals[1] / batches)}


# -------------------------------------------------------------------------------------- training
def train_one(name: str, seed: int, args: dict[str, Any], out: str) -> dict[str, Any]:
    """Train (or continue) one model x seed up to ``args['steps']``; return its result."""
    th.set_num_threads(1)
    path = Path(out) / "runs" / f"{name}_s{seed}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    th.manual_seed(seed)
    device = th.device(args.get("device", "cpu"))
    model = CopyModel(name, args["train_len"], cuda_graphs=args.get("cuda_graphs", False)).to(device)
    opt = th.optim.Adam(model.parameters(), lr=args["lr"])
    plateau = th.optim.lr_scheduler.ReduceLROnPlateau(opt, "min", factor=0.5, patience=5)
    run: dict[str, Any] = {
        "step": 0,
        "epoch": 0,
        "batch": 0,
        "curve": [],
        "evals": [],
        "wall_s": 0.0,
        "epoch_loss": 0.0,
    }
    state: State = None
    if path.is_file():
        saved = th.load(path, weights_only=True, map_location=device)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        plateau.load_state_dict(saved["plateau"])
        th.set_rng_state(saved["torch_rng"].cpu())
        if device.type == "cuda" and saved.get("cuda_rng") is not None:
            th.cuda.set_rng_state(saved["cuda_rng"].cpu(), device)
        run, state = saved["run"], saved["state"]
    per_epoch = args["batches_per_epoch"]
    running: list[float] = []
    since = time.time()  # wall time not yet added to run["wall_s"]

    def save() -> None:
        nonlocal since
        run["wall_s"] += time.time() - since
        since = time.time()
        blob = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "plateau": plateau.state_dict(),
            "torch_rng": th.get_rng_state(),
            "cuda_rng": th.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "run": run,
            "state": state,
        }
        buffer = io.BytesIO()
        th.save(blob, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    while run["step"] < args["steps"]:
        rng = np.random.default_rng([seed, run["epoch"]])
        x, y = copying_data(args["train_len"], 300, 64, rng)
        x, y = x.to(device), y.to(device)
        picks = rng.integers(0, 300, per_epoch)
        if run["batch"] == 0:
            state, run["epoch_loss"] = None, 0.0
        while run["batch"] < per_epoch and run["step"] < args["steps"]:
            b = picks[run["batch"]]
            logits, new_state = model(x[b], None if args["reset_state"] else detach(state))
            loss, _ = losses(logits, y[b])
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args["clip"])
            opt.step()
            state = detach(new_state)
            run["step"] += 1
            run["batch"] += 1
            value = float(loss.detach())  # one host read per step
            running.append(value)
            run["epoch_loss"] += value
            if run["step"] % args["log_every"] == 0:
                run["curve"].append([run["step"], float(np.mean(running)), opt.param_groups[0]["lr"]])
                running = []
            if run["step"] % args["eval_every"] == 0:
                ev = evaluate(model, args["train_len"], 4, 10_000 + run["step"], args["reset_state"])
                run["evals"].append([run["step"], ev["all_positions"], ev["output_phase"]])
            if run["step"] % args["checkpoint_every"] == 0:
                save()
        if run["batch"] >= per_epoch:
            if args["plateau"]:
                plateau.step(run["epoch_loss"] / per_epoch)
            run["epoch"] += 1
            run["batch"] = 0
    final = {
        str(T): evaluate(model, T, args["eval_batches"], 20_000 + T, args["reset_state"])
        for T in dict.fromkeys([args["train_len"], *args["test_lens"]])
    }
    run["final"] = final
    save()
    params = sum(p.numel() for p in model.parameters())
    return {
        "model": name,
        "seed": seed,
        "steps": run["step"],
        "params": params,
        "wall_s": round(run["wall_s"], 1),
        "final": final,
        "curve": run["curve"],
        "evals": run["evals"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--seeds", default="0", help="comma-separated, e.g. 0,1,2")
    parser.add_argument("--steps", type=int, help="Adam steps per run (default 200 epochs x 200 = 40,000)")
    parser.add_argument("--train-len", type=int, default=50, help="blanks in training (the authors' T)")
    parser.add_argument("--test-lens", default="200", help="comma-separated test lengths")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--plateau", action="store_true", help="step ReduceLROnPlateau per epoch (theirs never does)")
    parser.add_argument("--reset-state", action="store_true", help="start every batch from a zero state")
    parser.add_argument("--eval-batches", type=int, default=50, help="batches of 64 per final evaluation")
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time on a local Ray")
    parser.add_argument("--address", help="a Ray cluster (auto or HOST:PORT)")
    parser.add_argument("--quick", action="store_true", help="every model for 20 steps (about 2 minutes)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--cuda-graphs", action="store_true", help="replay the RIM rows' unrolls as CUDA graphs")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    try:
        device = th.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device: use cpu or cuda")
    if device.type == "cuda" and not th.cuda.is_available():
        parser.error(f"--device {args.device} needs a CUDA GPU and none is visible: use --device cpu")
    models = args.models.split(",")
    for name in models:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}: choose from {', '.join(MODELS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        test_lens = [int(s) for s in args.test_lens.split(",")]
    except ValueError:
        parser.error("--seeds and --test-lens take comma-separated integers, e.g. 0,1,2")
    steps = args.steps or (20 if args.quick else 40_000)
    settings = {
        "steps": steps,
        "train_len": args.train_len,
        "test_lens": test_lens,
        "lr": args.lr,
        "clip": args.clip,
        "plateau": args.plateau,
        "reset_state": args.reset_state,
        "batches_per_epoch": 200,
        "eval_batches": 2 if args.quick else args.eval_batches,
        "checkpoint_every": args.checkpoint_every,
        "log_every": max(1, min(100, steps // 10)),
        "eval_every": max(1, min(1000, steps // 4)),
        "device": str(device),
        "cuda_graphs": args.cuda_graphs,
    }
    out = Path(args.out) / ("quick" if args.quick else "")
    jobs = [(m, s) for s in seeds for m in models]
    results = []
    if args.parallel > 1 or args.address:
        import ray

        from rim_agents.study import start_ray

        start_ray(args.address, args.parallel if not args.address else None)
        task = ray.remote(num_cpus=1)(train_one)
        refs = {task.remote(m, s, settings, str(out)): (m, s) for m, s in jobs}
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            m, s = refs.pop(done[0])
            results.append(ray.get(done[0]))
            print(f"finished {m} seed {s}", flush=True)
            write_results(out, settings, results)
    else:
        for m, s in jobs:
            print(f"training {m} seed {s}: {steps} steps", flush=True)
            results.append(train_one(m, s, settings, str(out)))
            write_results(out, settings, results)
    print((out / "copying.md").read_text())


def write_results(out: Path, settings: dict[str, Any], results: list[dict[str, Any]]) -> None:
    """``copying.json`` (settings and every run) and ``copying.md`` (mean [min, max] over seeds)."""
    lens = [str(T) for T in dict.fromkeys([settings["train_len"], *settings["test_lens"]])]
    order = {name: i for i, name in enumerate(MODELS)}
    names = sorted({r["model"] for r in results}, key=lambda n: order[n])
    head = [f"CE all positions, T={T}" for T in lens] + [f"CE output phase, T={T}" for T in lens]
    lines = [
        f"Copying task as the authors run it: train T={settings['train_len']}, {settings['steps']} Adam steps "
        f"(lr {settings['lr']}, clip {settings['clip']}) of batch 64; cross-entropy in nats, mean [min, max] "
        "over seeds; the paper's figure is the all-positions CE at T=200.",
        "",
        "| model | params | seeds | " + " | ".join(head) + " | paper, T=200 | wall min per run |",
        "|---" * (5 + len(head)) + "|",
    ]
    for name in names:
        runs = [r for r in results if r["model"] == name]
        cells = []
        for key in ("all_positions", "output_phase"):
            for T in lens:
                v = np.array([r["final"][T][key] for r in runs])
                cells.append(f"{v.mean():.3f} [{v.min():.3f}, {v.max():.3f}]" if len(v) > 1 else f"{v[0]:.3f}")
        wall = np.mean([r["wall_s"] for r in runs]) / 60
        lines.append(
            f"| {name} | {runs[0]['params']:,} | {len(runs)} | "
            + " | ".join(cells)
            + f" | {PAPER.get(name, '-')} | {wall:.1f} |"
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "copying.json", json.dumps({"settings": settings, "runs": results}, indent=1) + "\n")
    atomic_write_text(out / "copying.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
