"""How strongly a fresh RIM core reads its input and how much its communication moves its state.

Cores of the MiniGrid family's RIM settings (``configs/minigrid.yaml``, all RIMs active), on
random ReLU inputs of the extractor's width, at the zero state:

- the standard deviation of the input's part of the cell gates (bias left out) with the input
  attention, with the direct read (``input_attention=false``), and for ``nn.LSTM(d_in, K * d_h)``;
- the norm of the communication's update against the norm of the state it is added to, step by
  step over an unroll (the default initialisation; ``comm_zero_init`` makes it exactly zero).

Means over ``--inits`` initialisations (seeds 0, 1, ...).

    python benchmarks/init_scales.py [--inits 5] [--steps 20]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch as th
from torch import nn

from rim_agents import RIMCore
from rim_agents.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inits", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    config = load_config(env="RIMAgents/PickupCue-6x6-v0", core="rims")
    rims = dataclasses.replace(config.rims, k_active=config.rims.num_units)
    d_in = config.policy.features_extractor_kwargs["features_dim"]
    K, d_h = rims.num_units, rims.unit_size

    reads: dict[str, list[float]] = {"input attention": [], "direct read": [], f"nn.LSTM({d_in}, {K * d_h})": []}
    ratios = th.zeros(args.steps)
    for seed in range(args.inits):
        th.manual_seed(seed)
        x = th.relu(th.randn(args.steps, args.batch, d_in))
        h = th.zeros(K, args.batch, d_h)
        for attention, name in ((True, "input attention"), (False, "direct read")):
            th.manual_seed(seed)
            cell = RIMCore(d_in, dataclasses.replace(rims, input_attention=attention)).cell
            with th.no_grad():
                step = cell.prepare(x[:1], False).unbind()[0]
                if attention:
                    gates = cell._attend_vector(step, h)[0] - step.bias
                else:
                    gates = step.gate_proj - (cell.bias_ih + cell.bias_hh)
            reads[name].append(gates.std().item())
        th.manual_seed(seed)
        lstm = nn.LSTM(d_in, K * d_h)
        reads[f"nn.LSTM({d_in}, {K * d_h})"].append((x[0] @ lstm.weight_ih_l0.T).std().item())

        th.manual_seed(seed)
        cell = RIMCore(d_in, rims).cell
        with th.no_grad():
            h, c = th.zeros(K, args.batch, d_h), th.zeros(K, args.batch, d_h)
            for t, step in enumerate(cell.prepare(x, False).unbind()):
                h_new, c = cell._cell(cell._attend_vector(step, h)[0], h, c)
                update = cell._comm_update(h_new)
                ratios[t] += (update.norm() / h_new.norm()).item() / args.inits
                h = h_new + update

    print(f"RIM settings: {K} RIMs of {d_h}, input {d_in}; {args.inits} initialisations, batch {args.batch}")
    for name, values in reads.items():
        print(f"  std of the input's part of the gates, {name}: {sum(values) / len(values):.3f}")
    shown = ", ".join(f"{r:.2f}" for r in ratios[:5].tolist())
    print(
        f"  |communication update| / |state|, steps 1-5: {shown}; mean of steps 6-{args.steps}: "
        f"{ratios[5:].mean().item():.2f}"
    )


if __name__ == "__main__":
    main()
