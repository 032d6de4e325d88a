"""GPU-readiness of the RIM loop: nothing inside a step, or inside the time loop, reads a tensor back
to the host (``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``float()/int()/bool()`` on a
value), which would stall a GPU once per step."""

from __future__ import annotations

import ast
import inspect
import textwrap

from rim_agents.rim import RIMCell, RIMCore

SYNC_METHODS = {"item", "tolist", "cpu", "numpy"}
SYNC_BUILTINS = {"float", "int", "bool"}
STEP_METHODS = (
    "step", "_attend_vector", "_attend_tokens", "_token_probs", "_vector_probs", "_null_attention", "_top_k_mask",
    "_straight_through", "_sampled_mask", "_cell",
    "_communicate", "_comm_update",
)  # fmt: skip


def host_reads(node: ast.AST) -> list[str]:
    found = []
    for call in ast.walk(node):
        if not isinstance(call, ast.Call):
            continue
        if isinstance(call.func, ast.Attribute) and call.func.attr in SYNC_METHODS:
            found.append(f".{call.func.attr}() at line {call.lineno}")
        if isinstance(call.func, ast.Name) and call.func.id in SYNC_BUILTINS:
            found.append(f"{call.func.id}() at line {call.lineno}")
    return found


def test_a_step_reads_nothing_back_to_the_host() -> None:
    for name in STEP_METHODS:
        tree = ast.parse(textwrap.dedent(inspect.getsource(getattr(RIMCell, name))))
        assert host_reads(tree) == [], name


def test_the_time_loop_reads_nothing_back_to_the_host() -> None:
    tree = ast.parse(textwrap.dedent(inspect.getsource(RIMCore.run)))
    loops = [n for n in ast.walk(tree) if isinstance(n, ast.For) and "step_input" in ast.unparse(n.target)]
    assert len(loops) == 1
    assert host_reads(loops[0]) == []


def test_the_checker_finds_host_reads() -> None:
    code = "def f(x):\n    for t in x:\n        y = t.item() + float(t)\n"
    assert host_reads(ast.parse(code)) == [".item() at line 3", "float() at line 3"]


def test_the_kernel_counter_counts_each_step_once() -> None:
    """benchmarks/kernel_count.py on the CPU: operators grow with T (they are counted per step), and
    the RIM step runs far more of them than nn.LSTM's fused loop."""
    import importlib.util
    from pathlib import Path

    import torch as th
    from torch import nn

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_count.py"
    spec = importlib.util.spec_from_file_location("kernel_count", path)
    assert spec is not None and spec.loader is not None
    kc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kc)
    cpu = th.device("cpu")
    th.manual_seed(0)
    core = RIMCore(16, num_units=4, k_active=2, unit_size=8, cell="lstm")
    per_t = {}
    for T in (2, 6):
        fwd, bwd = kc.count(core, th.randn(T, 3, 16), th.randn(T, 3, 32), cpu)
        per_t[T] = (fwd, bwd)
    # The time loop's operators repeat once per step: four more steps, four times the step's count.
    step_fwd = (per_t[6][0] - per_t[2][0]) / 4
    assert step_fwd > 10
    assert per_t[6][0] > per_t[2][0] and per_t[6][1] > per_t[2][1]
    lstm_fwd, _ = kc.count(nn.LSTM(16, 32), th.randn(6, 3, 16), th.randn(6, 3, 32), cpu)
    assert lstm_fwd < per_t[6][0] / 5
