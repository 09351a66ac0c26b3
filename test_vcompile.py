"""Tests for vcompile.py, one block per section of the module, same banners.

Every block has tests parametrized over the devices present (CPU always,
CUDA when there is a GPU). Where a process boundary matters (warm starts,
copied caches, crashes, concurrency) the test runs a child process through
run_child(), which calls a function of this file and returns its JSON.
"""

from __future__ import annotations

import ast
import json
import logging
import operator
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.fx as fx

import bench
import vcompile
from vcompile import CompilationConfig, Range, counters

REPO = os.path.dirname(os.path.abspath(__file__))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# fp32 everywhere. Inductor fuses and reorders reductions, so results differ
# from eager in the last bits; the GPU also runs different kernels.
TOL = {"cpu": 1e-4, "cuda": 2e-3}

# The configuration of the core issue: three ranges and two single sizes.
ISSUE_CONFIG = dict(compile_ranges_endpoints=[8, 32], max_num_batched_tokens=256, compile_sizes=[4, 16])
ISSUE_SIZES = [1, 4, 8, 9, 16, 32, 33, 256]
# Two ranges and a size, for the process tests: every kind of entry, fewer compiles.
SMALL_CONFIG = dict(compile_ranges_endpoints=[8], max_num_batched_tokens=32, compile_sizes=[4])
SMALL_SIZES = [1, 4, 8, 9, 32]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    yield
    torch._dynamo.reset()  # no Dynamo cache entry leaks into the next test


def decoder(device: str, layers: int = 2, **kwargs) -> bench.Decoder:
    torch.manual_seed(0)
    return bench.Decoder(layers=layers, **kwargs).to(device)


def token_ids(size: int, device: str) -> torch.Tensor:
    return torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(size)).to(device)


def max_error(fn, model, sizes, device) -> dict[int, float]:
    """Largest |compiled - eager| at each size."""
    errors = {}
    with torch.no_grad():
        for size in sizes:
            ids = token_ids(size, device)
            errors[size] = (fn(ids) - model(ids)).abs().max().item()
    return errors


def config(**overrides) -> CompilationConfig:
    return CompilationConfig(**{"splitting_ops": bench.SPLITTING_OPS, "disable_cache": True, **overrides})


def counter_values() -> dict[str, int]:
    return {f: getattr(counters, f) for f in vcompile.CompilationCounter.__dataclass_fields__}


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vcompile"]


# --- child processes ---------------------------------------------------------


def run_child(function: str, timeout: float = 600, env: dict | None = None, check: bool = True, **kwargs):
    """Runs test_vcompile.<function>(**kwargs) in a fresh Python process and
    returns what it returned (JSON), or the CompletedProcess when check=False."""
    code = ("import json, sys, test_vcompile as t; "
            f"print('\\n' + json.dumps(t.{function}(**json.loads(sys.argv[1]))))")
    child_env = {**os.environ, "PYTHONPATH": REPO, **(env or {})}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], cwd=REPO, env=child_env,
                          capture_output=True, text=True, timeout=timeout)
    if not check:
        return proc
    if proc.returncode != 0:
        raise AssertionError(f"child {function} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class _Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(f"{record.levelname} {record.getMessage()}")


def record_logs() -> _Recorder:
    recorder = _Recorder()
    logger = logging.getLogger("vcompile")
    logger.addHandler(recorder)
    logger.setLevel(logging.INFO)
    return recorder


def child_decoder(root: str | None, device: str = "cpu", layers: int = 2, sizes=SMALL_SIZES,
                  config_kwargs: dict | None = None, first_size: int = 9) -> dict:
    """Child body: compile the decoder, compare every size with eager, report."""
    logs = record_logs()
    model = decoder(device, layers)
    cfg = CompilationConfig(**{"splitting_ops": bench.SPLITTING_OPS, "cache_dir": root,
                               **SMALL_CONFIG, **(config_kwargs or {})})
    fn = vcompile.compile(model, cfg)
    fn(token_ids(first_size, device))
    first = counter_values()
    errors = max_error(fn, model, sizes, device)
    later = {k: v - first[k] for k, v in counter_values().items()}
    return {"counters": first, "later": later, "errors": errors, "logs": logs.lines,
            "compilation_time": cfg.compilation_time,
            "hash_dir": fn.cache.hash_dir if fn.cache else None}


def assert_matches_eager(result: dict, device: str) -> None:
    bad = {size: err for size, err in result["errors"].items() if not err <= TOL[device]}
    assert not bad, f"outputs differ from eager beyond {TOL[device]}: {bad}"


# =============================================================================
# 1. Config, ranges, counters, logging
# =============================================================================


def test_ranges_follow_the_endpoints():
    cfg = CompilationConfig(compile_ranges_endpoints=[8, 32], max_num_batched_tokens=256)
    assert cfg.compile_ranges() == [Range(1, 8), Range(9, 32), Range(33, 256)]


def test_ranges_sort_dedupe_and_drop_endpoints_out_of_bounds():
    cfg = CompilationConfig(compile_ranges_endpoints=[32, 1, 8, 8, 256, 300, 32], max_num_batched_tokens=256)
    assert cfg.compile_ranges() == [Range(1, 8), Range(9, 32), Range(33, 256)]
    assert CompilationConfig(max_num_batched_tokens=64).compile_ranges() == [Range(1, 64)]
    assert CompilationConfig(compile_ranges_endpoints=[2], max_num_batched_tokens=2).compile_ranges() == [Range(1, 2)]


def test_range_is_inclusive_and_prints_as_interval():
    r = Range(9, 32)
    assert 9 in r and 32 in r and 8 not in r and 33 not in r
    assert str(r) == "[9, 32]" and Range(4, 4).is_single_size() and not r.is_single_size()
    with pytest.raises(ValueError):
        Range(5, 4)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="splitting op"):
        CompilationConfig(splitting_ops=["attention"])
    with pytest.raises(ValueError, match="compile_sizes"):
        CompilationConfig(compile_sizes=[0])
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        CompilationConfig(max_num_batched_tokens=0)


def test_disable_cache_env(monkeypatch):
    monkeypatch.setenv("VCOMPILE_DISABLE_CACHE", "1")
    assert CompilationConfig().disable_cache


def test_counters_expect_checks_deltas():
    with counters.expect(num_graphs_seen=1, num_inductor_compiles=0):
        counters.num_graphs_seen += 1
    with pytest.raises(AssertionError, match="num_graphs_seen: expected \\+2, got \\+1"):
        with counters.expect(num_graphs_seen=2):
            counters.num_graphs_seen += 1
    with pytest.raises(TypeError, match="no such counters"):
        with counters.expect(num_graphs=1):
            pass


@pytest.mark.parametrize("device", DEVICES)
def test_library_logs_and_never_prints(device, capsys, caplog):
    caplog.set_level(logging.INFO, logger="vcompile")
    model = decoder(device)
    vcompile.compile(model, config(**SMALL_CONFIG))(token_ids(9, device))
    out = capsys.readouterr()
    assert out.out == "" and "vcompile" not in out.err
    assert any(m.startswith("torch.compile took") for m in messages(caplog))


# =============================================================================
# 2. Monitor (vLLM PR 40641)
# =============================================================================


def test_monitor_adds_elapsed_to_the_right_total():
    cfg = CompilationConfig()
    with vcompile.monitor_torch_compile(cfg):
        pass
    with vcompile.monitor_torch_compile(cfg, is_encoder=True):
        pass
    assert cfg.compilation_time > 0 and cfg.encoder_compilation_time > 0


def test_monitor_adds_nothing_when_the_work_raises(caplog):
    caplog.set_level(logging.INFO, logger="vcompile")
    cfg = CompilationConfig()
    with pytest.raises(RuntimeError):
        with vcompile.monitor_torch_compile(cfg):
            raise RuntimeError("compile failed")
    assert cfg.compilation_time == 0.0 and not messages(caplog)


@pytest.mark.parametrize("device", DEVICES)
def test_monitor_total_covers_the_whole_first_call(device, caplog):
    caplog.set_level(logging.INFO, logger="vcompile")
    model = decoder(device)
    cfg = config(**SMALL_CONFIG)
    fn = vcompile.compile(model, cfg)
    import time
    started = time.perf_counter()
    fn(token_ids(9, device))
    wall = time.perf_counter() - started
    logs = messages(caplog)
    totals = [m for m in logs if m.startswith("torch.compile took")]
    dynamo = [m for m in logs if m.startswith("Dynamo bytecode transform time")]
    ranges = [m for m in logs if m.startswith("Compiling a graph for compile range")]
    assert len(totals) == 1 and len(dynamo) == 1 and len(ranges) == 3
    assert totals[0] == f"torch.compile took {cfg.compilation_time:.2f} s in total"
    # The total is one interval around all the work, so it holds every part
    # the backend logs (Dynamo, then each range's compiles) and fits in the call.
    parts = float(dynamo[0].split(": ")[1].split()[0]) + sum(float(m.split(" takes ")[1].split()[0]) for m in ranges)
    assert parts - 0.02 <= cfg.compilation_time <= wall
    assert cfg.encoder_compilation_time == 0.0
    fn(token_ids(4, device))
    assert len([m for m in messages(caplog) if m.startswith("torch.compile took")]) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_encoder_time_goes_to_the_encoder_total_only(device):
    model = decoder(device)
    cfg = config(**SMALL_CONFIG)
    vcompile.compile(model, cfg, is_encoder=True)(token_ids(9, device))
    assert cfg.encoder_compilation_time > 0 and cfg.compilation_time == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_failed_compile_adds_no_time(device, monkeypatch):
    def broken_inductor(*args, **kwargs):
        raise RuntimeError("inductor failed")

    monkeypatch.setattr(vcompile, "inductor_compile", broken_inductor)
    cfg = config(**SMALL_CONFIG)
    fn = vcompile.compile(decoder(device), cfg)
    with pytest.raises(Exception, match="inductor failed"):
        fn(token_ids(9, device))
    assert cfg.compilation_time == 0.0 and fn.fn is None
    monkeypatch.undo()  # the next call compiles for real and is timed
    fn(token_ids(9, device))
    assert cfg.compilation_time > 0


# =============================================================================
# 3. Cache directory and cache key (vLLM PR 39718)
# =============================================================================

# (filled in with the warm-start tests below)


# =============================================================================
# 4. Graph splitting
# =============================================================================


@torch.library.custom_op("vcompile_test::attn", mutates_args=())
def _attn(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_attn.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("vcompile_test::pair", mutates_args=())
def _pair(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x + 1, x - 1


@_pair.register_fake
def _(x):
    return torch.empty_like(x), torch.empty_like(x)


def hand_built_graph() -> fx.GraphModule:
    """relu | attn, attn | neg | pair, getitem, getitem | add, as ATen calls."""
    g = fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.ops.aten.relu.default, (x,))
    b = g.call_function(torch.ops.vcompile_test.attn.default, (a,))
    c = g.call_function(torch.ops.vcompile_test.attn, (b,))
    d = g.call_function(torch.ops.aten.neg.default, (c,))
    e = g.call_function(torch.ops.vcompile_test.pair.default, (d,))
    e0 = g.call_function(operator.getitem, (e, 0))
    e1 = g.call_function(operator.getitem, (e, 1))
    g.output(g.call_function(torch.ops.aten.add.Tensor, (e0, e1)))
    return fx.GraphModule(torch.nn.Module(), g)


def piece_ops(split_gm, name) -> list[str]:
    return [str(n.target) for n in getattr(split_gm, name).graph.nodes if n.op == "call_function"]


def test_split_pieces_in_graph_order_with_consecutive_ops_together():
    split_gm, pieces = vcompile.split_graph(hand_built_graph(), ["vcompile_test::attn", "vcompile_test::pair"])
    assert pieces == [("submod_0", False), ("submod_1", True), ("submod_2", False),
                      ("submod_3", True), ("submod_4", False)]
    assert piece_ops(split_gm, "submod_1") == ["vcompile_test.attn.default", "vcompile_test.attn"]
    # The getitems stay with the op whose tuple they unpack.
    assert piece_ops(split_gm, "submod_3") == ["vcompile_test.pair.default", "<built-in function getitem>",
                                               "<built-in function getitem>"]
    x = torch.randn(3)
    torch.testing.assert_close(split_gm(x), hand_built_graph()(x))


def test_split_op_names_match_packet_or_overload():
    gm = hand_built_graph()
    assert [s for _, s in vcompile.split_graph(gm, [])[1]] == [False]  # no splitting ops: one piece
    by_overload = vcompile.split_graph(gm, ["vcompile_test::attn.default"])[1]
    assert by_overload == [("submod_0", False), ("submod_1", True), ("submod_2", False)]  # the packet call is not .default
    other = vcompile.split_graph(gm, ["vcompile_test::attn.other"])[1]
    assert other == [("submod_0", False)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layers", [1, 3])
def test_piece_counters_for_the_decoder(device, layers):
    with counters.expect(num_piecewise_graphs_seen=2 * layers + 1, num_piecewise_capturable_graphs_seen=layers + 1,
                         num_graphs_seen=1):
        vcompile.compile(decoder(device, layers), config(max_num_batched_tokens=16))(token_ids(9, device))


# =============================================================================
# 5. Compile entries and concrete arguments (vLLM PR 35472)
# =============================================================================


def test_entries_put_sizes_before_ranges_and_stretch_encoders():
    cfg = CompilationConfig(**ISSUE_CONFIG)
    entries = vcompile.compile_entries(cfg, is_encoder=False)
    assert entries == [Range(4, 4), Range(16, 16), Range(1, 8), Range(9, 32), Range(33, 256)]
    encoder = vcompile.compile_entries(cfg, is_encoder=True)
    assert encoder[-1] == Range(33, 2**31 - 1) and encoder[:-1] == entries[:-1]
    assert vcompile.compile_entries(CompilationConfig(max_num_batched_tokens=1, compile_sizes=[1]), False) == [Range(1, 1)]


def test_exact_size_wins_then_the_first_range():
    entries = vcompile.compile_entries(CompilationConfig(**ISSUE_CONFIG), is_encoder=False)
    assert [entries[vcompile.find_entry(n, entries)] for n in (4, 5, 16, 17, 256)] == \
        [Range(4, 4), Range(1, 8), Range(16, 16), Range(9, 32), Range(33, 256)]
    with pytest.raises(ValueError, match=r"size 257 is outside every compile range.*\[4, 4\].*\[33, 256\]"):
        vcompile.find_entry(257, entries)


def dynamo_graph(fn, *args) -> fx.GraphModule:
    """The graph Dynamo hands a backend for fn(*args), dim 0 of args[0] dynamic."""
    captured = []
    torch._dynamo.mark_dynamic(args[0], 0)
    torch.compile(fn, backend=lambda gm, _: captured.append(gm) or gm.forward, fullgraph=True, dynamic=False)(*args)
    return captured[0]


def test_concrete_args_substitute_the_size_and_keep_the_storage_offset():
    base = torch.randn(20, 16)
    gm = dynamo_graph(lambda x, w: x @ w, base[2:], torch.randn(16, 8))
    symbolic = vcompile.fake_args_from_graph(gm)
    size_arg, offset_arg, x, w = vcompile.concrete_args(gm, 5)
    # Dynamo made both the token count and the view's offset symbols; only
    # the first one is a size.
    assert [type(a) for a in symbolic[:2]] == [torch.SymInt, torch.SymInt]
    assert (size_arg, offset_arg) == (5, 32)
    assert tuple(x.shape) == (5, 16) and x.stride() == (16, 1) and x.storage_offset() == 32
    assert tuple(w.shape) == (16, 8)
    # A fresh ShapeEnv: the single-size compile sees plain ints, no symbols.
    assert x.fake_mode is not symbolic[2].fake_mode and not x.fake_mode.shape_env.var_to_range
    assert vcompile.where_is_the_size(symbolic) == (0, None)


@pytest.mark.parametrize("device", DEVICES)
def test_single_size_artifact_is_specialized(device):
    w = torch.randn(16, 8, device=device)
    gm = dynamo_graph(lambda x, w: torch.relu(x @ w) * 2, torch.randn(6, 16, device=device), w)
    manager = vcompile.CompilerManager()
    sized = manager.compile(gm, vcompile.concrete_args(gm, 4), Range(4, 4), 0, 1)
    ranged = manager.compile(gm, vcompile.fake_args_from_graph(gm), Range(1, 8), 0, 1)
    symbol = str(vcompile.fake_args_from_graph(gm)[0]).encode()
    assert b"(4, 16)" in vcompile.artifact_bytes(sized) and symbol not in vcompile.artifact_bytes(sized)
    assert b"(" + symbol + b", 16)" in vcompile.artifact_bytes(ranged)
    x5 = torch.randn(5, 16, device=device)
    torch.testing.assert_close(ranged(5, x5, w)[0], torch.relu(x5 @ w) * 2)  # the graph returns a 1-tuple
    with pytest.raises(AssertionError, match="expected size 5==4"):
        sized(5, x5, w)


# =============================================================================
# 6. Compiler manager and the in-memory cache (vLLM PR 41023)
# =============================================================================


@pytest.mark.parametrize("device", DEVICES)
def test_inductor_compiles_do_not_grow_with_depth(device):
    results = {}
    for layers in (2, 16):
        model = decoder(device, layers)
        fn = vcompile.compile(model, config(**ISSUE_CONFIG))
        before = counter_values()
        fn(token_ids(9, device))
        results[layers] = {k: v - before[k] for k, v in counter_values().items()}
        errors = max_error(fn, model, ISSUE_SIZES, device)
        assert all(err <= TOL[device] for err in errors.values()), (layers, errors)
        torch._dynamo.reset()
    entries = 5
    # Three distinct pieces (embedding + first QKV, a layer's middle, the last
    # MLP + norm) compiled once per entry, at any depth.
    assert results[2]["num_inductor_compiles"] == results[16]["num_inductor_compiles"] == 3 * entries
    assert results[2]["num_inmemory_cache_hits"] == 0
    # 15 middle pieces (a layer's MLP and the next one's QKV): one compiles, 14 hit.
    assert results[16]["num_inmemory_cache_hits"] == (16 - 2) * entries
    # Every piece x entry request counts, hits included.
    assert results[16]["num_backend_compilations"] == (16 + 1) * entries


class RepeatedMLP(torch.nn.Module):
    """p0 | attn | mlp | attn | mlp: the last compiled piece is isomorphic to
    the one before it, so every entry's last compile request is a hit."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.proj = torch.nn.Linear(hidden, hidden)
        self.mlps = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(hidden, 2 * hidden), torch.nn.SiLU(),
                                                            torch.nn.Linear(2 * hidden, hidden)) for _ in range(2))

    def forward(self, x):
        x = self.proj(x)
        for mlp in self.mlps:
            x = mlp(torch.ops.vcompile_bench.attention(x, x, x, 2))
        return x


@pytest.mark.parametrize("device", DEVICES)
def test_range_time_is_logged_when_the_last_piece_is_a_cache_hit(device, caplog):
    caplog.set_level(logging.INFO, logger="vcompile")
    torch.manual_seed(0)
    model = RepeatedMLP().to(device)
    cfg = config(**SMALL_CONFIG)
    entries = vcompile.compile_entries(cfg, is_encoder=False)
    x = torch.randn(9, 32, device=device)
    with counters.expect(num_inmemory_cache_hits=len(entries), num_inductor_compiles=2 * len(entries),
                         num_backend_compilations=3 * len(entries)):
        out = vcompile.compile(model, cfg)(x)
    torch.testing.assert_close(out, model(x), atol=TOL[device], rtol=TOL[device])
    logged = [m.split(" takes ")[0] for m in messages(caplog) if m.startswith("Compiling a graph for compile range")]
    # PR 41023: the hit path used to return before this log line.
    assert logged == [f"Compiling a graph for compile range {e}" for e in entries]


@torch.library.custom_op("vcompile_test::widen", mutates_args=())
def _widen(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x], dim=-1)


@_widen.register_fake
def _(x):
    return x.new_empty(x.shape[0], 2 * x.shape[1])


@torch.library.custom_op("vcompile_test::to_double", mutates_args=())
def _to_double(x: torch.Tensor) -> torch.Tensor:
    return x.double()


@_to_double.register_fake
def _(x):
    return torch.empty_like(x, dtype=torch.float64)


class OneDifference(torch.nn.Module):
    """Pieces after a reference piece `relu(x) + 1`: one copy of it, then one
    differing only in an op, one only in a shape, one only in a dtype."""

    def forward(self, x):
        x = x * 2
        x = torch.ops.vcompile_test.attn(x)
        x = torch.relu(x) + 1  # the reference
        x = torch.ops.vcompile_test.attn(x)
        x = torch.relu(x) + 1  # the same: must share
        x = torch.ops.vcompile_test.attn(x)
        x = torch.sigmoid(x) + 1  # another op
        x = torch.ops.vcompile_test.widen(x)
        x = torch.relu(x) + 1  # another shape
        x = torch.ops.vcompile_test.to_double(x)
        return torch.relu(x) + 1  # another dtype


@pytest.mark.parametrize("device", DEVICES)
def test_pieces_that_differ_in_an_op_shape_or_dtype_do_not_share(device):
    cfg = config(splitting_ops=["vcompile_test::attn", "vcompile_test::widen", "vcompile_test::to_double"],
                 **SMALL_CONFIG)
    entries = len(vcompile.compile_entries(cfg, is_encoder=False))
    x = torch.randn(9, 32, device=device)
    with counters.expect(num_inmemory_cache_hits=entries, num_inductor_compiles=5 * entries):
        out = vcompile.compile(OneDifference(), cfg)(x)
    assert out.dtype == torch.float64 and out.shape == (9, 64)
    torch.testing.assert_close(out, OneDifference()(x), atol=TOL[device], rtol=TOL[device])


# =============================================================================
# 7. Piecewise interpreter and per-piece range dispatch (vLLM PR 35472)
# =============================================================================


@pytest.mark.parametrize("device", DEVICES)
def test_everything_compiles_during_the_first_call(device):
    model = decoder(device)
    fn = vcompile.compile(model, config(**ISSUE_CONFIG))
    pieces, entries = 3, 5  # a 2-layer decoder: 3 compiled pieces; 3 ranges + 2 sizes
    with counters.expect(num_graphs_seen=1, num_backend_compilations=pieces * entries):
        fn(token_ids(9, device))
    nothing_new = {f: 0 for f in counter_values()}
    with counters.expect(**nothing_new):
        errors = max_error(fn, model, ISSUE_SIZES, device)
    assert all(err <= TOL[device] for err in errors.values()), errors


def test_piece_runner_dispatches_on_the_size_argument():
    entries = vcompile.compile_entries(CompilationConfig(**ISSUE_CONFIG), is_encoder=False)
    fns = [lambda *a, i=i: (i,) for i in range(len(entries))]
    by_symint = vcompile.PieceRunner("p", entries, fns, size_arg=1, size_dim=None, returns_tuple=False)
    by_shape = vcompile.PieceRunner("p", entries, fns, size_arg=0, size_dim=0, returns_tuple=True)
    assert [entries[by_symint(None, n)] for n in (4, 8, 16, 100)] == [Range(4, 4), Range(1, 8), Range(16, 16), Range(33, 256)]
    assert entries[by_shape(torch.empty(16, 2))[0]] == Range(16, 16)
    with pytest.raises(ValueError, match="size 300"):
        by_symint(None, 300)


@pytest.mark.parametrize("device", DEVICES)
def test_size_outside_every_range_raises_and_the_model_still_works(device):
    model = decoder(device)
    fn = vcompile.compile(model, config(**SMALL_CONFIG))
    with counters.expect(num_graphs_seen=0, num_backend_compilations=0):  # refused before compiling
        with pytest.raises(ValueError, match=r"size 33 is outside every compile range: \[4, 4\], \[1, 8\], \[9, 32\]"):
            fn(token_ids(33, device))
    fn(token_ids(9, device))
    with pytest.raises(ValueError, match="size 40"):
        fn(token_ids(40, device))
    assert max(max_error(fn, model, [32, 1], device).values()) <= TOL[device]


@pytest.mark.parametrize("device", DEVICES)
def test_encoder_runs_sizes_beyond_the_token_budget(device):
    model = decoder(device)
    fn = vcompile.compile(model, config(**SMALL_CONFIG), is_encoder=True)
    fn(token_ids(9, device))
    assert max(max_error(fn, model, [33, 200], device).values()) <= TOL[device]


@pytest.mark.parametrize("device", DEVICES)
def test_first_call_of_size_one_does_not_specialize(device):
    # Dynamo specializes a marked-dynamic dimension of size 1 unless told not to.
    model = decoder(device)
    fn = vcompile.compile(model, config(**SMALL_CONFIG))
    fn(token_ids(1, device))
    assert max(max_error(fn, model, [1, 5, 32], device).values()) <= TOL[device]


# =============================================================================
# 8. Codegen with inlined submodules (vLLM PR 40151)
# =============================================================================

# (see the codegen tests below)


# =============================================================================
# 9. Serializable compiled function (vLLM PR 40151)
# =============================================================================

# (see the save and load tests below)


# =============================================================================
# 10. The backend, and compile()
# =============================================================================


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_model_keeps_the_forward_signature(device):
    import inspect
    model = decoder(device)
    assert inspect.signature(vcompile.compile(model, config())) == inspect.signature(model.forward)


@pytest.mark.parametrize("device", DEVICES)
def test_wrong_dtype_rank_or_device_raises_type_error(device):
    model = decoder(device)
    fn = vcompile.compile(model, config(**SMALL_CONFIG))
    fn(token_ids(9, device))
    expected = f"argument 'input_ids' was compiled for a 1-d torch.int64 tensor on {token_ids(1, device).device}"
    with counters.expect(num_graphs_seen=0, num_backend_compilations=0):
        with pytest.raises(TypeError, match=f"{expected}; got a 1-d torch.int32 tensor"):
            fn(token_ids(9, device).int())
        with pytest.raises(TypeError, match=f"{expected}; got a 2-d torch.int64 tensor"):
            fn(token_ids(9, device).view(3, 3))
        with pytest.raises(TypeError, match=f"{expected}; got a 1-d torch.int64 tensor on meta"):
            fn(torch.zeros(9, dtype=torch.long, device="meta"))
        with pytest.raises(TypeError, match="got list"):
            fn([1, 2, 3])
    assert max(max_error(fn, model, [9], device).values()) <= TOL[device]


@pytest.mark.parametrize("device", DEVICES)
def test_dynamic_arg_dims_must_name_a_tensor_dimension(device):
    fn = vcompile.compile(decoder(device), config(**SMALL_CONFIG), dynamic_arg_dims={"ids": 0})
    with pytest.raises(ValueError, match="dynamic_arg_dims names ids:0"):
        fn(token_ids(9, device))
    fn = vcompile.compile(decoder(device), config(**SMALL_CONFIG), dynamic_arg_dims={"input_ids": 1})
    with pytest.raises(ValueError, match="input_ids:1"):
        fn(token_ids(9, device))
