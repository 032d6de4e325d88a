"""Peak memory of one PPO update (the optimisation epochs over one rollout, not the rollout) per core,
on the Atari config (BreakoutNoFrameskip-v4, 8 envs x 128 steps, its PPO and RIM settings).

Each core runs in a fresh process. On the CPU we sample the process's resident memory every
millisecond during ``train()`` and report the peak above the resident memory just before it; on
a GPU, ``torch.cuda.max_memory_allocated`` during ``train()`` above what was allocated before.

    python benchmarks/update_memory.py [--cores none,lstm,rims] [--device cpu] [--n-steps 128]

``--n-steps`` shortens the rollout (a multiple of the config's 32-step training sequences): the
figures are then not the Atari config's, only the path (``gpu_check.sh --quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENV = "BreakoutNoFrameskip-v4"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(core: str, device: str, n_steps: int = 128) -> dict:
    import torch as th

    from rim_agents.config import load_config
    from rim_agents.models import build_model, make_env

    th.set_num_threads(1)
    config = load_config(ENV, core, overrides=[f"ppo.n_steps={n_steps}"], flags={"seed": 0, "device": device})
    model = build_model(config, make_env(config))
    result: dict = {"core": core, "device": device}
    inner = model.train

    def measured_train() -> None:
        if device == "cuda":
            th.cuda.synchronize()
            th.cuda.reset_peak_memory_stats()
            before = th.cuda.memory_allocated()
            inner()
            th.cuda.synchronize()
            result["peak_mib"] = (th.cuda.max_memory_allocated() - before) / 2**20
            return
        before = rss_bytes()
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_bytes())
                time.sleep(0.001)

        thread = threading.Thread(target=sample)
        thread.start()
        try:
            inner()
        finally:
            done.set()
            thread.join()
        result["peak_mib"] = (max(peak[0], rss_bytes()) - before) / 2**20
        result["rss_before_mib"] = before / 2**20

    model.train = measured_train  # type: ignore[method-assign]
    model.learn(config.n_envs * config.ppo.n_steps)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", default="none,lstm,rims")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--n-steps", type=int, default=128, help="steps per env per rollout (the config's 128)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.device, args.n_steps)))
        return
    rows = []
    for core in args.cores.split(","):
        cmd = [sys.executable, __file__, "--child", core, "--device", args.device, "--n-steps", str(args.n_steps)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, cwd=ROOT)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = {r["core"]: r["peak_mib"] for r in rows}
    shape = "Atari config" if args.n_steps == 128 else f"Atari config with n_steps {args.n_steps}"
    print(f"{ENV}, {shape}, one PPO update, device {args.device}")
    print(f"{'core':<8}{'peak MiB':>10}{'vs none':>9}{'vs lstm':>9}")
    for r in rows:
        vs_none = f"{r['peak_mib'] / base['none']:.2f}x" if base.get("none") else "-"
        vs_lstm = f"{r['peak_mib'] / base['lstm']:.2f}x" if base.get("lstm") else "-"
        print(f"{r['core']:<8}{r['peak_mib']:>10.1f}{vs_none:>9}{vs_lstm:>9}")


if __name__ == "__main__":
    main()
