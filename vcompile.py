# SPDX-License-Identifier: Apache-2.0
# Copyright 2026 The vcompile authors
"""vcompile: how vLLM drives torch.compile, in one file.

One Dynamo trace, its token count unbacked where the model allows it. A
backend that splits the graph at attention-like ops and compiles every piece
for every shape range before it returns. An in-memory cache so that
identical layers compile once. A self-contained on-disk cache
that starts a fresh process warm: no Dynamo trace, no Inductor compile, no FX
graph deserialization. One monitor that owns the compile-time numbers.

The sections follow the data, top to bottom:
   1. config, ranges, counters, logging
   2. monitor                                  vLLM PR 40641
   3. cache directory and cache key            vLLM PR 39718
   4. files on disk: atomic writes, checksums, read-only views, trust
   5. graph splitting
   6. compile entries, size guards and concrete arguments   vLLM PR 35472
   7. graph passes: vLLM's post-grad pass manager   vLLM PRs 10273, 24252
   8. compiler manager, in-memory cache        vLLM PR 41023
   9. compiling once per machine
  10. piecewise interpreter, range dispatch    vLLM PR 35472
  11. piecewise CUDA graphs                   vLLM's CUDAGraphWrapper
  12. codegen with inlined submodules          vLLM PR 40151
  13. serializable compiled function: save and load   vLLM PR 40151
  14. the backend
  15. the first call: load, or compile and save, or trace (JIT)
  16. how the token count is traced: unbacked, and the backed fallback   vLLM PR 44256
  17. sizes the first trace excludes: later traces
  18. compiling at start-up (prepare)
  19. what a save cannot carry: models people bring
  20. the cache from the command line: list, remove, prune

Usage:
    fn = vcompile.compile(model, vcompile.CompilationConfig(splitting_ops=["my::attention"]))
    out = fn(input_ids)   # first call: load from the cache, or compile everything
"""

from __future__ import annotations

# Copied into another project, the file says which vcompile it is; pyproject
# reads its version from here.
__version__ = "0.6.0"

import argparse
import atexit
import builtins
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import importlib
import inspect
import io
import json
import logging
import math
import operator
import os
import pickle
import platform
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from typing import Any, Callable
from unittest.mock import patch

import sympy
import torch
import torch._functorch._aot_autograd.autograd_cache as aot_autograd_cache
import torch._inductor.codecache
import torch.fx as fx
from torch._dynamo.aot_compile import SerializableCallable
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
from torch._inductor.standalone_compile import AOTCompiledArtifact
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode, ShapeEnv
from torch.fx.passes.split_module import split_module
from torch.utils._sympy.printers import PythonPrinter
from torch.utils._sympy.symbol import SymT, symbol_is_type

# =============================================================================
# 1. Config, ranges, counters, logging
#
# What to compile and for which token counts (the splitting ops, the ranges,
# the single sizes), where to cache it, and the counters through which tests
# see what happened: compiles, cache hits, loads, saves.
# =============================================================================

logger = logging.getLogger("vcompile")  # the library logs; it never prints

# vcompile leans on torch's newest compile entry points (standalone_compile
# with aot=True, torch._dynamo.aot_compile, load_compiled_function, AOTAutograd's
# cache key), which move between releases. These are the releases its tests
# run on; pyproject's bound says the same.
TESTED_TORCH = ((2, 11), (2, 15))
_torch_release = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
if not TESTED_TORCH[0] <= _torch_release <= TESTED_TORCH[1]:
    logger.warning("vcompile: torch %s is outside the tested range %d.%d to %d.%d; it may work, or fail in "
                   "torch's compile entry points", torch.__version__, *TESTED_TORCH[0], *TESTED_TORCH[1])

# Bump when the layout of a saved artifact changes. Files of another version
# fail to load with a clear reason and are compiled again, never misread.
FORMAT_VERSION = 3


@dataclasses.dataclass(frozen=True)
class Range:
    """Token counts from `start` to `end`, both inclusive."""

    start: int
    end: int

    def __post_init__(self):
        if not 1 <= self.start <= self.end:
            raise ValueError(f"vcompile: bad range [{self.start}, {self.end}]")

    def __contains__(self, size: int) -> bool:
        return self.start <= size <= self.end

    def is_single_size(self) -> bool:
        return self.start == self.end

    def __str__(self) -> str:
        return f"[{self.start}, {self.end}]"


@dataclasses.dataclass
class CompilationConfig:
    # "ns::op" matches every overload of the op, "ns::op.overload" only that one.
    splitting_ops: list[str] = dataclasses.field(default_factory=list)
    compile_ranges_endpoints: list[int] = dataclasses.field(default_factory=list)
    max_num_batched_tokens: int = 8192
    compile_sizes: list[int] = dataclasses.field(default_factory=list)
    cache_dir: str | None = None  # None: $VCOMPILE_CACHE_ROOT, else ~/.cache/vcompile
    disable_cache: bool = False
    # Load from folders other users could have written (section 4); also
    # VCOMPILE_TRUST_CACHE=1. For a cache a team shares on purpose.
    trust_cache: bool = False
    # How long a process waits for another one compiling the same piece into
    # the same cache root (section 9) before it compiles the piece itself.
    compile_wait_s: float = 300.0
    # How many traces a model that branches on the token count may get, the
    # first included (section 17): each costs a trace and its compiles.
    max_traces: int = 4
    use_aot: bool = True
    use_codegen: bool = True
    # Graph passes (section 7): each pass_(graph: torch.fx.Graph) -> None edits
    # a piece's post-grad graph in place; optional applies_to(Range) -> bool,
    # range_endpoints() -> list[int] (where applies_to changes its answer)
    # and uuid() -> str.
    passes: list = dataclasses.field(default_factory=list)
    # Token counts at which every compiled piece runs as a CUDA graph (section 11).
    cudagraph_capture_sizes: list[int] = dataclasses.field(default_factory=list)
    # Written by monitor_torch_compile alone. Before PR 40641 the backend also
    # added to these and encoder time was counted twice.
    compilation_time: float = 0.0
    encoder_compilation_time: float = 0.0

    def __post_init__(self):
        if os.environ.get("VCOMPILE_DISABLE_CACHE") == "1":
            self.disable_cache = True
        if os.environ.get("VCOMPILE_TRUST_CACHE") == "1":
            self.trust_cache = True
        for op in self.splitting_ops:
            if not isinstance(op, str) or "::" not in op:
                raise ValueError(f"vcompile: splitting op {op!r} is not of the form 'ns::op[.overload]'")
        for name in ("max_num_batched_tokens", "max_traces"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"vcompile: {name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("compile_ranges_endpoints", "compile_sizes", "cudagraph_capture_sizes"):
            bad = [v for v in getattr(self, name) if not _is_int(v) or v < 1]
            if bad:
                raise ValueError(f"vcompile: {name} must hold positive ints, got {bad}")
        for graph_pass in self.passes:
            if not callable(graph_pass):
                raise TypeError(f"vcompile: graph pass {graph_pass!r} is not callable")
            pass_uuid(graph_pass)  # a pass whose source cannot be read fails here, not at the first call
        bad = [v for v in pass_endpoints(self.passes) if not _is_int(v) or v < 1]
        if bad:
            raise ValueError(f"vcompile: a graph pass's range_endpoints() must be positive ints, got {bad}")

    def compile_ranges(self) -> list[Range]:
        """The ranges every piece is compiled for, with symbolic shapes.

        Endpoints are sorted and deduplicated, only 1 < e < max survive, and
        max_num_batched_tokens always closes the last range: [8, 32] with max
        256 gives [1, 8], [9, 32], [33, 256]. A graph pass's range_endpoints()
        are endpoints too, as vLLM adds its fusions' token limits: a pass
        that applies up to 256 tokens gets a range that ends there, where
        otherwise [1, 8192] would hold sizes on both sides and the pass
        would apply nowhere.
        """
        top = self.max_num_batched_tokens
        ends = sorted({e for e in [*self.compile_ranges_endpoints, *pass_endpoints(self.passes)] if 1 < e < top})
        ends.append(top)
        return [Range(start + 1, end) for start, end in zip([0] + ends, ends)]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass
class CompilationCounter:
    num_graphs_seen: int = 0  # Dynamo graphs handed to the backend
    num_piecewise_graphs_seen: int = 0  # pieces after splitting, splitting-op pieces too
    num_piecewise_capturable_graphs_seen: int = 0  # pieces that get compiled
    num_backend_compilations: int = 0  # piece x compile-entry requests, cache hits too
    num_inductor_compiles: int = 0  # compiles that ran Inductor to the end
    num_inmemory_cache_hits: int = 0  # requests served by an isomorphic piece's artifact
    num_artifacts_from_other_processes: int = 0  # requests another process on this root compiled meanwhile
    num_compiled_artifacts_saved: int = 0  # unique piece artifacts written to disk
    num_compiled_artifacts_loaded: int = 0  # unique piece artifacts read from disk
    num_aot_compiles: int = 0
    num_unbacked_traces: int = 0  # graphs traced with the token count unbacked: no guard on it (section 16)
    num_backed_traces: int = 0  # graphs traced backed, their guards on the token count kept (section 6)
    num_extra_traces: int = 0  # traces of sizes the first trace's guards exclude (section 17), of the above
    num_aot_artifacts_saved: int = 0
    num_aot_artifacts_loaded: int = 0
    num_fx_graph_deserializations: int = 0  # only the use_codegen=False baseline has any
    num_cudagraph_captured: int = 0  # pieces captured as CUDA graphs, once per piece and capture size (section 11)

    @contextlib.contextmanager
    def expect(self, **deltas: int):
        """Assert how much the named counters grow inside the block."""
        unknown = sorted(set(deltas) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"vcompile: no such counters: {unknown}")
        before = dataclasses.replace(self)
        yield
        wrong = [
            f"{name}: expected {want:+d}, got {getattr(self, name) - getattr(before, name):+d}"
            for name, want in deltas.items()
            if getattr(self, name) - getattr(before, name) != want
        ]
        if wrong:
            raise AssertionError("counter deltas differ: " + "; ".join(wrong))


counters = CompilationCounter()


def describe(e: Exception) -> str:
    """An exception as one log line: its type and its message's first line."""
    return f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e).strip() else type(e).__name__


def cause_of(e: BaseException | None, kind: type) -> BaseException | None:
    """e, or the first exception of that kind among what caused it: torch
    wraps what a backend or a pass raises, once or twice."""
    while e is not None and not isinstance(e, kind):
        e = e.__cause__ or e.__context__
    return e

# =============================================================================
# 2. Monitor (vLLM PR 40641)
#
# Problem: the backend and the caller each timed their own slice of the work
# and added it to the totals, so the reported compile time matched neither the
# wall clock nor itself, and encoder time was counted twice. Fix: one context
# manager wraps the whole first call and is the only writer of the totals.
# =============================================================================

# Start of the compile in flight; the backend reads it to log Dynamo's share.
_compile_started_at = 0.0
_capture_s = 0.0  # seconds spent capturing CUDA graphs (section 11): not compile time


@contextlib.contextmanager
def monitor_torch_compile(config: CompilationConfig, is_encoder: bool = False):
    global _compile_started_at
    started, captured_s = time.perf_counter(), _capture_s
    _compile_started_at = started
    yield  # an exception here leaves the totals untouched: failed work is not compile time
    elapsed = time.perf_counter() - started - (_capture_s - captured_s)
    if is_encoder:
        config.encoder_compilation_time += elapsed
    else:
        config.compilation_time += elapsed
    logger.info("torch.compile took %.2f s in total", elapsed)


# =============================================================================
# 3. Cache directory and cache key (vLLM PR 39718)
#
# Problem: the AOT artifact lived under the cache root, but Inductor and Triton
# unpacked their own state (generated code, compiled kernels) into
# /tmp/torchinductor_$USER. A copied cache, or a machine whose /tmp was wiped,
# paid that unpacking (on CPU, a gcc run per kernel) on every fresh start.
# Fix: point TORCHINDUCTOR_CACHE_DIR at <hash>/inductor_cache while compiling
# and loading, so the <hash> folder alone is a complete cache:
#
#   <root>/torch_aot_compile/<hash>/inductor_cache/       Inductor, Triton beneath
#   <root>/torch_aot_compile/<hash>/rank_<r>_<dp>/model     the AOT artifact
#   <root>/torch_aot_compile/<hash>/rank_<r>_<dp>/model.py  its execution code, to read
#   <root>/torch_aot_compile/<hash>/rank_<r>_<dp>/pieces/   JIT mode's per-piece artifacts
#   <root>/torch_aot_compile/<hash>/shared_pieces/          what one process compiles for all (section 9),
#                                                           and the vector ISA it probed (section 13)
#
# A cache is built once and then shipped: baked into a container image,
# mounted read-only, copied to many nodes. A root that holds this model's
# cache but cannot be written is loaded as it is (Inductor reads its kernels
# through a writable view, below) and nothing is written under it.
# =============================================================================


def cache_root(config: CompilationConfig) -> str:
    return (
        config.cache_dir
        or os.environ.get("VCOMPILE_CACHE_ROOT")
        or os.path.join(os.path.expanduser("~"), ".cache", "vcompile")
    )


def cache_key_factors(model: torch.nn.Module, config: CompilationConfig, is_encoder: bool,
                      dynamic_arg_dims: dict[str, int], device: torch.device) -> dict:
    """Everything that changes the generated code. Weights' values are not in
    it: they are graph inputs, read from the model at every call.
    """
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    return {
        "vcompile_format": FORMAT_VERSION,
        # A vendored copy pickles its own module path into what it saves: a
        # folder it wrote is its own, not the installed vcompile's.
        "vcompile_module": __name__,
        "python": platform.python_version(),  # the artifact holds bytecode
        "torch": [torch.__version__, torch.version.git_version, torch.version.cuda],
        "inductor_config": inductor_config.save_config_portable(),
        "functorch_config": functorch_config.save_config_portable(),
        "device": device_description(device),
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "tensors": [(name, list(t.shape), str(t.dtype))
                    for name, t in [*model.named_parameters(), *model.named_buffers()]],
        "splitting_ops": sorted(set(config.splitting_ops)),
        "compile_entries": [str(e) for e in compile_entries(config, is_encoder)],
        "dynamic_arg_dims": sorted(dynamic_arg_dims.items()),
        "use_codegen": config.use_codegen,  # the saved function differs; use_aot does not
        "passes": pass_identities(config.passes, compile_entries(config, is_encoder)),
    }


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda {torch.cuda.get_device_name(device)} sm_{major}{minor}"
    # CPU code is built for the vector ISA of this machine: name the processor.
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{device.type} {line.split(':', 1)[1].strip()}"
    return f"{device.type} {platform.machine()} {platform.processor()}"


def distributed_ranks() -> tuple[int, int]:
    """(rank, data-parallel rank). A torch.distributed world is one
    data-parallel replica, as a vLLM engine's is, so its dp rank is 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), 0
    return 0, 0


@dataclasses.dataclass
class CacheDir:
    hash_dir: str
    rank_dir: str
    writable: bool  # False: load what is there, write nothing, leave Inductor at its default

    def __post_init__(self):
        self.inductor_dir = os.path.join(self.hash_dir, "inductor_cache")
        self.shared_dir = os.path.join(self.hash_dir, "shared_pieces")
        self.model_path = os.path.join(self.rank_dir, "model")
        self.pieces_dir = os.path.join(self.rank_dir, "pieces")
        self.unavailable_path = os.path.join(self.rank_dir, "model.unavailable")  # why AOT cannot load back

    def trace_path(self, trace: int) -> str:  # the first trace's is model_path (section 17)
        return self.model_path if trace == 0 else f"{self.model_path}.trace{trace}"

    def has_pieces(self) -> bool:
        return os.path.isdir(self.pieces_dir) and bool(os.listdir(self.pieces_dir))


_reported_roots: set[str] = set()  # roots (and paths) already named in a log line: once per process


def cache_hash(factors: dict) -> str:
    return hashlib.sha256(json.dumps(factors, sort_keys=True, default=str).encode()).hexdigest()[:16]


def open_cache_dir(factors: dict, config: CompilationConfig) -> CacheDir | None:
    if config.disable_cache or os.environ.get("VCOMPILE_DISABLE_CACHE") == "1":
        return None
    root = cache_root(config)
    # Absolute: the read-only view and the command-line link (section 4) are
    # symlinks in the temp folder, and a relative target there dangles, so a
    # relative root that is read-only or holds a space stopped the model.
    hash_dir = os.path.join(os.path.abspath(root), "torch_aot_compile", cache_hash(factors))
    rank, dp_rank = distributed_ranks()
    cache = CacheDir(hash_dir, os.path.join(hash_dir, f"rank_{rank}_{dp_rank}"), writable=True)
    why = None if config.trust_cache else untrusted(cache)
    if why is not None:  # read nothing there, write nothing there: compile in memory
        if hash_dir not in _reported_roots:
            _reported_roots.add(hash_dir)
            logger.warning("vcompile: not using the compile cache in %s: %s. A saved artifact is code, and whoever "
                           "can write there could run code in this process; compiling without the cache. "
                           "VCOMPILE_TRUST_CACHE=1 trusts every user who can write the cache root", hash_dir, why)
        return None
    try:
        os.makedirs(cache.inductor_dir, exist_ok=True)
        os.makedirs(cache.pieces_dir, exist_ok=True)
        os.makedirs(cache.shared_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache.rank_dir):  # the folders may exist on a read-only mount
            pass
    except OSError as e:
        cache.writable = False
        if root in _reported_roots:
            return cache
        _reported_roots.add(root)
        if os.path.isfile(cache.model_path) or cache.has_pieces():  # a shipped cache: what it is for
            logger.info("vcompile: the compile cache under %s is read-only (%s); loading from it and "
                        "writing nothing there", root, e)
        else:  # a cache that cannot be written must not stop the model: compile in memory
            logger.warning("vcompile: cannot write the compile cache under %s (%s); "
                           "compiling without saving", root, e)
    return cache


# Each hash folder keeps the factors its hash was made from, readable, so that
# a miss can say what changed (below) and `python -m vcompile cache` can say
# what a folder holds. Only cold starts touch them: a warm load reads none.
FACTORS_FILE = "cache_key_factors.json"
# Kept in that file beside the factors, not hashed: the vcompile that wrote
# the folder (FORMAT_VERSION says when a file cannot be read) and how the
# token count was traced (section 16).
NOT_FACTORS = ("vcompile_version", "traced")
LAST_LOADED_FILE = "last_loaded"  # its mtime: when a start last loaded from this folder


def explain_miss(cache: CacheDir, factors: dict) -> None:
    """One INFO line on a cold start: either this model was never compiled
    under this root, or which factors differ from the nearest folder that
    holds the same model class. Silent misses cost vLLM users whole warm
    starts (a HOME path in the key, a per-pod value in the config); with the
    factors on disk, vcompile names the culprit at the moment of the miss."""
    factors = json.loads(json.dumps(factors, default=str))  # as the file has them: tuples are lists
    parent = os.path.dirname(cache.hash_dir)
    nearest = []
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        path = os.path.join(parent, name, FACTORS_FILE)
        if name == os.path.basename(cache.hash_dir) or not os.path.isfile(path):
            continue
        with contextlib.suppress(OSError, ValueError):
            with open(path) as f:
                other = json.load(f)
            for key in NOT_FACTORS:
                other.pop(key, None)
            if other.get("model") == factors["model"]:
                nearest.append((factor_differences(other, factors), name))
    if not nearest:
        logger.info("vcompile: no compiled %s under %s: this is its first compile here", factors["model"],
                    os.path.dirname(parent))
        return
    differences, name = min(nearest, key=lambda found: (len(found[0]), found[1]))
    logger.info("vcompile: no artifact for this configuration of %s (%s); the nearest folder, %s, differs in: %s",
                factors["model"], os.path.basename(cache.hash_dir), name, "; ".join(differences))


def factor_differences(old: dict, new: dict) -> list[str]:
    """`name: old -> new` for each factor that differs, shortened to read."""
    def short(value, limit=60) -> str:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            text = ", ".join(value)  # compile entries: [4, 4], [1, 8], ...
        else:
            text = value if isinstance(value, str) else json.dumps(value)
        return text if len(text) <= limit else text[:limit - 3] + "..."

    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "tensors" and isinstance(a, list) and isinstance(b, list):  # [name, shape, dtype] rows
            same_dtypes = {row[2] for row in a} == {row[2] for row in b}
            a, b = ({row[0]: json.dumps(row[1]) + ("" if same_dtypes else f" {row[2]}") for row in t} for t in (a, b))
        if isinstance(a, dict) and isinstance(b, dict):  # the keys that differ, a few of them
            changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            parts = [f"{k} {short(a.get(k, 'absent'), 24)} -> {short(b.get(k, 'absent'), 24)}" for k in changed[:3]]
            out.append(f"{key}: " + ", ".join(parts) + (f" (+{len(changed) - 3} more)" if len(changed) > 3 else ""))
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):  # e.g. torch: version, commit, CUDA
            out.append(f"{key}: " + ", ".join(f"{short(x)} -> {short(y)}" for x, y in zip(a, b) if x != y))
        elif key == "passes" and isinstance(a, list) and isinstance(b, list):  # one added or removed: name it
            out.append(f"{key}: " + ", ".join([f"without {short(x)}" for x in a if x not in b] +
                                              [f"with {short(y)}" for y in b if y not in a]))
        else:
            out.append(f"{key}: {short(a)} -> {short(b)}")
    return out


def record_cold_start(cache: CacheDir, factors: dict) -> None:
    """Nothing to load for this hash: say why, and leave this folder's
    factors for the next miss and for `python -m vcompile cache`."""
    try:
        explain_miss(cache, factors)
    except Exception as e:  # an explanation must never stop the model
        logger.debug("vcompile: cannot explain this cache miss: %s", describe(e))
    record_factors(cache, fresh=True, **factors, vcompile_version=__version__)


def recorded_factors(cache: CacheDir) -> dict:
    try:
        with open(os.path.join(cache.hash_dir, FACTORS_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):  # none yet, or a folder from before 0.2.0
        return {}


def record_factors(cache: CacheDir, fresh: bool = False, **fields) -> None:
    """Adds to the factors file (fresh: replaces it): the factors at a cold
    start; after its trace, how it was traced ("unbacked" or "backed", and
    why not unbacked) and, with several traces, the sizes each runs. None is
    not recorded."""
    if not cache.writable:
        return
    try:
        kept = {} if fresh else recorded_factors(cache)
        write_atomically(os.path.join(cache.hash_dir, FACTORS_FILE), json.dumps(
            {**kept, **{k: v for k, v in fields.items() if v is not None}}, indent=1, default=str).encode())
    except Exception as e:  # as above
        logger.debug("vcompile: cannot record %s in %s: %s", ", ".join(fields), cache.hash_dir, describe(e))


def mark_loaded(cache: CacheDir) -> None:
    # One utime per start (microseconds): the listing's "last loaded", and
    # what `--prune` removes least recently loaded first.
    if not cache.writable:
        return
    with contextlib.suppress(OSError):  # a folder pruned meanwhile
        path = os.path.join(cache.hash_dir, LAST_LOADED_FILE)
        open(path, "a").close()
        os.utime(path)


@contextlib.contextmanager
def inductor_cache_dir(cache: CacheDir | None):
    """Inductor's and Triton's files in the hash folder, for the compile, the
    load and the first run (where kernels load); vLLM sets it for the rest of
    the process, which a library should not. `temporary_cache_dir` clears
    Inductor's in-process lookups on entry and exit, so files of another root
    are not reused by path."""
    if cache is None:
        yield
        return
    if cache.writable:
        inductor_dir = command_line_safe(cache.inductor_dir)
    else:
        inductor_dir = writable_view(cache.inductor_dir) if os.path.isdir(cache.inductor_dir) else None
    if inductor_dir is None:  # Inductor keeps its default folder
        yield
        return
    # Inductor pins TRITON_CACHE_DIR the first time it is needed; unpinned,
    # Triton nests under the Inductor folder we set.
    triton_dir = os.environ.pop("TRITON_CACHE_DIR", None)
    try:
        with temporary_cache_dir(inductor_dir):
            yield
    finally:
        os.environ.pop("TRITON_CACHE_DIR", None)
        if triton_dir is not None:
            os.environ["TRITON_CACHE_DIR"] = triton_dir


# =============================================================================
# 4. Files on disk: atomic writes, checksums, read-only views, trust
#
# What the cache folder of section 3 asks of the file system. Every file is
# written whole or not at all, and checked before it is read. A read-only
# folder is read through a writable view, a path a compiler command line
# cannot hold through a link. And a folder is read only if no other user
# could have written it: an artifact is code.
# =============================================================================

_views: dict[str, str] = {}  # read-only Inductor folder -> its writable view, one per process


def writable_view(folder: str) -> str | None:
    """A temp folder that mirrors a read-only Inductor folder, each file a
    symlink. Inductor creates lock files beside the kernels it finds, so it
    fails on the read-only folder, and left at its default folder it rebuilds
    every kernel with g++, slower than a cold compile. A few milliseconds
    once per process (a symlink per file); removed when the process exits."""
    if folder in _views:
        return _views[folder]
    try:
        view = tempfile.mkdtemp(prefix="vcompile-view-")
        for parent, _, names in os.walk(folder):
            mirror = os.path.join(view, os.path.relpath(parent, folder))
            os.makedirs(mirror, exist_ok=True)
            for name in names:
                if not name.endswith(".lock"):  # a lock is written, never read
                    os.symlink(os.path.join(parent, name), os.path.join(mirror, name))
    except OSError as e:
        logger.warning("vcompile: cannot make a writable view of %s (%s); Inductor keeps its default folder "
                       "and rebuilds the kernels it cannot find", folder, e)
        return None
    atexit.register(shutil.rmtree, view, ignore_errors=True)
    _views[folder] = view
    return view


def command_line_safe(path: str) -> str | None:
    """A path to the same folder that survives an unquoted command line:
    Inductor's CPU builder joins g++'s paths into one string unquoted and
    shlex-splits it (torch 2.11 to 2.15), so a root such as "Application
    Support" reached g++ as two arguments. Such a folder is reached through a
    symlink in the temp folder; None (after one warning) if none can be made."""
    if shlex.quote(path) == path:
        return path
    link = os.path.join(tempfile.gettempdir(), "vcompile-" + hashlib.sha256(path.encode()).hexdigest()[:16])
    try:
        if shlex.quote(link) != link:
            raise OSError(f"the temp folder {tempfile.gettempdir()!r} is not safe either")
        if os.path.realpath(link) != os.path.realpath(path):
            tmp = f"{link}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            os.symlink(path, tmp)
            os.replace(tmp, link)  # atomic: processes racing here all end with the same link
        return link
    except OSError as e:
        if path not in _reported_roots:
            _reported_roots.add(path)
            logger.warning("vcompile: the cache path %r cannot go on a compiler command line and no link "
                           "to it could be made (%s); Inductor's own files stay in its default folder", path, e)
        return None


# On disk an artifact is MAGIC, the format version, the sha256 of the payload,
# then the payload. A truncated, zero-length or bit-flipped file fails the
# check and is compiled again instead of being unpickled into wrong code.
MAGIC = b"VCOMPILE"
_HEADER = len(MAGIC) + 4 + 32


def write_atomically(path: str, data: bytes) -> None:
    """Temporary file in the same folder, then os.replace: a reader, or a
    process killed mid-write, sees the old file or the new one, never half."""
    os.makedirs(os.path.dirname(path), exist_ok=True)  # the folder may be pruned after it was opened
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_artifact(path: str, payload: bytes) -> None:
    write_atomically(path, MAGIC + FORMAT_VERSION.to_bytes(4, "little") + hashlib.sha256(payload).digest() + payload)


def read_artifact(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < _HEADER or not data.startswith(MAGIC):
        raise ValueError(f"not a vcompile artifact ({len(data)} bytes: empty, truncated or foreign)")
    version = int.from_bytes(data[len(MAGIC):len(MAGIC) + 4], "little")
    if version != FORMAT_VERSION:
        raise ValueError(f"written in artifact format {version}; this vcompile reads format {FORMAT_VERSION}")
    payload = data[_HEADER:]
    if hashlib.sha256(payload).digest() != data[len(MAGIC) + 4:_HEADER]:
        raise ValueError("checksum mismatch: the file is truncated or corrupt")
    return payload


def lock_file(path: str, wait_s: float) -> int | None:
    """An exclusive flock on path, as an open descriptor (os.close releases
    it), or None if another process still holds it after wait_s. The kernel
    drops a flock when its process dies, however it dies: a process killed
    mid-compile never blocks the others, as a pid in a lock file would."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.05)


# Trust. An artifact is unpickled and its kernels are loaded as shared
# libraries: whoever can write a cache folder runs code in every process that
# starts warm from it, checksum or not. So, as ssh refuses a key file others
# can write, a start reads a hash folder only if every folder and file from
# <root>/torch_aot_compile down is owned by this user or root and writable by
# neither group nor others. Folders above it (a sticky /tmp) are not judged.


def untrusted(cache: CacheDir) -> str | None:
    """Why this start must not read the hash folder, or None. A few
    microseconds a path: under 2 ms for the suite's decoder."""
    me = os.getuid()
    paths = [os.path.dirname(cache.hash_dir), cache.hash_dir]
    for top in (cache.rank_dir, cache.inductor_dir, cache.shared_dir):
        for parent, folders, files in os.walk(top):
            paths += [parent, *(os.path.join(parent, name) for name in files)]
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:  # not there yet: nothing to trust
            continue
        if st.st_uid not in (me, 0) or st.st_mode & 0o022:
            why = "owned by another user" if st.st_uid not in (me, 0) else "writable by other users"
            return f"{path} is {why} (owner uid {st.st_uid}, mode {oct(st.st_mode & 0o7777)})"
    return None


@contextlib.contextmanager
def private_files():
    """What this process creates meanwhile is writable by its owner alone:
    under umask 000 the next start would refuse the folders vcompile and
    Inductor create. The umask is the process's; the first call holds its lock."""
    umask = os.umask(0o022)
    os.umask(umask | 0o022)
    try:
        yield
    finally:
        os.umask(umask)


# =============================================================================
# 5. Graph splitting
#
# Attention cannot be compiled into the same graph as the layers around it
# (vLLM's attention kernels and CUDA-graph capture need it outside), so the
# Dynamo graph is cut at every splitting op. What lies between two attention
# calls, a layer's MLP and the next layer's QKV projection, is one piece, and
# in a decoder those pieces are isomorphic from layer to layer.
# =============================================================================


def is_splitting_op(node: fx.Node, splitting_ops: list[str]) -> bool:
    if node.op != "call_function":
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverloadPacket):  # what Dynamo records for torch.ops.ns.op(...)
        return target._qualified_op_name in splitting_ops
    if isinstance(target, torch._ops.OpOverload):
        packet = target._schema.name  # "ns::op"
        return packet in splitting_ops or f"{packet}.{target._overloadname}" in splitting_ops
    return False


def traced_value(node: fx.Node) -> Any:
    """What the node computed while tracing: Dynamo's example_value, make_fx's val."""
    return node.meta.get("example_value", node.meta.get("val"))


def computes_sizes_only(node: fx.Node) -> bool:
    """Arithmetic on sizes (`n - 1`, `n // 2`) and the runtime asserts an
    unbacked trace records (`u0 >= 0`, first thing in the graph)."""
    return node.target is torch.ops.aten._assert_scalar.default or (
        isinstance(traced_value(node), (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)))


def split_graph(gm: fx.GraphModule, splitting_ops: list[str]) -> tuple[fx.GraphModule, list[tuple[str, bool]]]:
    """Returns the split graph and its pieces in graph order as (name, is_splitting)."""
    piece_of: dict[fx.Node, int] = {}
    splitting_pieces: set[int] = set()
    sizes_only: list[tuple[fx.Node, int]] = []  # with the piece that was open when they came
    piece, piece_splits = -1, None
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        # A getitem that unpacks a tuple stays with the node that made it: a
        # piece may not take a tuple as input (Inductor and AOTAutograd want
        # flat tensors). One that slices a tensor (`y[n - 1:]`) is an op like
        # any other: kept with a splitting op, it took `n - 1` from the next
        # piece, which needs the splitting op's output (a cycle).
        source = node.args[0] if node.op == "call_function" and node.target is operator.getitem else None
        if source in piece_of and not isinstance(traced_value(source), torch.Tensor):
            piece_of[node] = piece_of[source]
            continue
        splits = is_splitting_op(node, splitting_ops)
        if not splits and computes_sizes_only(node):
            sizes_only.append((node, piece))
            continue
        if splits != piece_splits:  # consecutive splitting ops share one piece
            piece, piece_splits = piece + 1, splits
            if splits:
                splitting_pieces.add(piece)
        piece_of[node] = piece
    # A size is computed where it is first used, and an assert runs in the
    # next compiled piece: alone, they made a piece with no tensor in it (an
    # Inductor compile for each entry, and a call at every step), and sent
    # the token count across a split. Moved in the graph, never up, since
    # split_module orders the pieces by where their first node stands.
    first_node: dict[int, fx.Node] = {}
    for node in gm.graph.nodes:
        if node in piece_of:
            first_node.setdefault(piece_of[node], node)
    compiled = sorted(set(first_node) - splitting_pieces)
    for node, open_piece in reversed(sizes_only):  # backwards: users that are sizes too have moved already
        users = {user for user in node.users if user in piece_of}
        later = [p for p in compiled if p > open_piece]
        if users:
            before = node.next
            while before not in users:
                before = before.next
        elif open_piece in compiled or not later:
            piece_of[node] = max(open_piece, 0)
            continue
        else:
            before = first_node[later[0]]
        before.prepend(node)
        piece_of[node] = piece_of[before]
    # keep_original_order: in-place ops must not move across one another.
    split_gm = split_module(gm, None, lambda node: piece_of[node], keep_original_order=True)
    pieces = [(f"submod_{i}", i in splitting_pieces) for i in sorted(set(piece_of.values()))]
    return split_gm, pieces


def warn_uncalled_splitting_ops(gm: fx.GraphModule, splitting_ops: list[str]) -> None:
    """A name the graph never calls (a typo, another model's namespace, an
    ATen op the model reaches through a torch function, which Dynamo records
    as that function) splits nothing, and the model compiled whole or with
    attention inside a piece, in silence."""
    called = [op for op in splitting_ops if any(is_splitting_op(node, [op]) for node in gm.graph.nodes)]
    for op in sorted(set(splitting_ops) - set(called)):
        logger.warning("vcompile: splitting op %s is never called in the traced graph; %s", op,
                       f"the graph splits at {', '.join(called)} alone" if called
                       else "no splitting op is called, so the graph compiles as one piece")


# =============================================================================
# 6. Compile entries, size guards and concrete arguments (vLLM PR 35472)
#
# Before PR 35472 pieces compiled lazily, on the first call that reached a
# range, with whatever inputs that call had. Now every piece is compiled up
# front for every entry, so the arguments come from the graph itself: once per
# range with the symbolic shapes Dynamo traced, and once per compile size with
# concrete fake tensors, the size in place of every dimension symbol, in a
# fresh ShapeEnv (empty_strided, storage offset kept), so Inductor
# specializes to that size.
#
# Size guards. vLLM drops every Dynamo guard, and so does vcompile, so a
# model that branches on the token count (`if x.size(0) >= 4:`, traced at 4)
# would run the traced branch at every size: silently wrong at 1 to 3. Of
# Dynamo's guards vcompile keeps those on the size symbols alone, as a table
# from each size up to max_num_batched_tokens to the entry that runs it,
# saved with the artifact: one list index per call. Sizes where a guard fails
# get traces of their own (section 17); a size no trace runs is refused. An
# unbacked trace (section 16) records runtime asserts instead
# (`torch._check(x.shape[0] <= 42)` becomes `u0 <= 42`), which the compiled
# code would raise inside a kernel: the table keeps those too, and 43 is
# refused with the check named before anything runs.
# =============================================================================


def compile_entries(config: CompilationConfig, is_encoder: bool) -> list[Range]:
    """Every (piece, entry) pair is compiled up front. Single sizes come first:
    scanning in order, an exact size then wins over the range that holds it."""
    ranges = config.compile_ranges()
    if is_encoder:  # encoder inputs (image patches) have no token budget
        ranges[-1] = Range(ranges[-1].start, 2**31 - 1)
    sizes = [Range(s, s) for s in sorted(set(config.compile_sizes)) if Range(s, s) not in ranges]
    return sizes + ranges


OUTSIDE_EVERY_ENTRY, GUARD_FAILS = -1, -2  # what the size table holds where no entry runs a size


def entry_of(size: int, entries: list[Range], holds: Callable[[int], bool]) -> int:
    """The first entry that holds `size`, or why none runs it."""
    index = next((i for i, entry in enumerate(entries) if size in entry), OUTSIDE_EVERY_ENTRY)
    return index if index == OUTSIDE_EVERY_ENTRY or holds(size) else GUARD_FAILS


def find_entry(size: int, entries: list[Range]) -> int:
    index = entry_of(size, entries, lambda size: True)
    if index == OUTSIDE_EVERY_ENTRY:
        raise outside_every_entry(size, entries)
    return index


def outside_every_entry(size: int, entries: list[Range], what: str = "size") -> ValueError:
    # Never compile lazily instead: a compile in the middle of serving is the
    # stall PR 35472 removed, and running another range's code would be wrong.
    return ValueError(f"vcompile: {what} {size} is outside every compile range: " + ", ".join(map(str, entries)))


def fake_args_from_graph(gm: fx.GraphModule) -> list:
    return [node.meta["example_value"] for node in gm.graph.find_nodes(op="placeholder")]


def size_symbols(fake_args: list) -> set:
    """The symbols that are tensor dimensions: the token counts. Dynamo makes
    symbols of other things too (a view's storage offset) that are not sizes."""
    return {d.node.expr for a in fake_args if isinstance(a, torch.Tensor)
            for d in a.shape if isinstance(d, torch.SymInt) and d.node.expr.is_Symbol}


def size_guards(fake_args: list) -> list[tuple[str, str]]:
    """The guards Dynamo recorded on the token count alone, and the runtime
    asserts an unbacked trace recorded instead, as Python expressions in
    `size` (`size >= 4`), each guard with the line of model code that made
    it. Read before any piece compiles: an Inductor cache hit adds the guards
    of whichever trace filled that cache, not this one's."""
    dims = size_symbols(fake_args)
    shape_env = next((a.fake_mode.shape_env for a in fake_args if isinstance(a, FakeTensor)), None)
    if shape_env is None:
        return []
    size = sympy.Symbol("size", integer=True, positive=True)
    found = [(g.expr, getattr(g.sloc, "maybe_user_loc", None)) for g in shape_env.guards]
    found += [(a.expr, None) for asserts in shape_env.deferred_runtime_asserts.values() for a in asserts]
    guards: dict[str, str] = {}
    for expr, where in found:
        if expr.free_symbols and expr.free_symbols <= dims:
            expr = expr.xreplace(dict.fromkeys(dims, size))
            if expr is not sympy.true:  # Eq(u1, u0): two token dims, one size
                guards.setdefault(PythonPrinter().doprint(expr), where or "")
    return list(guards.items())


def guards_hold(guards: list[tuple[str, str]]) -> Callable[[int], bool]:
    return eval("lambda size: " + (" and ".join(f"({text})" for text, _ in guards) or "True"), {"math": math})


def size_table(entries: list[Range], guards: list[tuple[str, str]], top: int,
               serves: list[bool] | None = None) -> list[int]:
    """table[size]: the index of the entry that runs `size`, for 0 to `top`,
    or OUTSIDE_EVERY_ENTRY, or GUARD_FAILS. Built once per compile (8193
    sizes by default, a few milliseconds); a warning names each entry it
    leaves no size to, since that entry's artifacts can never run. A later
    trace (section 17) `serves` only the sizes earlier traces refuse: the
    others are GUARD_FAILS in its table, and its unused entries are dropped."""
    holds = guards_hold(guards)
    table = [entry_of(size, entries, holds) if serves is None or serves[size] else GUARD_FAILS
             for size in range(top + 1)]
    if serves is not None:
        return table
    for index in sorted(set(range(len(entries))) - set(table)):
        logger.warning("vcompile: no size in compile range %s satisfies the size guards %s; its artifacts will "
                       "never run", entries[index], " and ".join(text for text, _ in guards))
    return table


def entry_lookup(entries: list[Range], guards: list[tuple[str, str]], table: list[int]) -> Callable[[int], int]:
    """size -> index of the entry that runs it, or ValueError. One list index
    up to max_num_batched_tokens; beyond it (an encoder's last range is
    unbounded) the guards are evaluated."""
    holds = guards_hold(guards)

    def lookup(size: int) -> int:
        index = table[size] if size < len(table) else entry_of(size, entries, holds)
        if index < 0:
            raise size_refused(size, index, entries, guards, table)
        return index

    return lookup


def size_refused(size: int, why: int, entries: list[Range], guards: list[tuple[str, str]],
                 table: list[int]) -> ValueError:
    if why == OUTSIDE_EVERY_ENTRY:
        return outside_every_entry(size, entries)
    return ValueError(f"vcompile: size {size} fails {failed_guard(size, guards)}; the traced graph holds for "
                      f"sizes {sizes_in_words([s for s, index in enumerate(table) if index >= 0])} (checked up "
                      f"to max_num_batched_tokens, {len(table) - 1}), and running it at {size} would be wrong")


def failed_guard(size: int, guards: list[tuple[str, str]]) -> str:
    text, where = next((text, where) for text, where in guards if not guards_hold([(text, where)])(size))
    return f"the size guard `{text}` that tracing recorded" + (f" at `{where}`" if where else "")


def runs_of(sizes: list[int]) -> list[list[int]]:
    """[1, 2, 3, 7] -> [[1, 3], [7, 7]]"""
    runs: list[list[int]] = []
    for size in sizes:
        if runs and runs[-1][1] == size - 1:
            runs[-1][1] = size
        else:
            runs.append([size, size])
    return runs


def sizes_in_words(sizes: list[int]) -> str:
    """[1, 2, 3, 7] -> '1 to 3, 7'; long lists keep their first runs and the last."""
    words = [f"{a} to {b}" if a != b else str(a) for a, b in runs_of(sizes)]
    if len(words) > 6:
        words = words[:5] + [f"... ({len(sizes)} sizes)", words[-1]]
    return ", ".join(words) or "none"


def concrete_args(gm: fx.GraphModule, size: int) -> list:
    """The graph's fake arguments with the size in place of every dimension
    symbol; any other symbol keeps the value it had when Dynamo traced."""
    fakes = fake_args_from_graph(gm)
    dims = size_symbols(fakes)

    def concrete(value) -> int:
        if not isinstance(value, torch.SymInt):
            return int(value)
        expr, shape_env = value.node.expr, value.node.shape_env
        # Torch versions differ here: 2.13 renamed var_to_val (the old name warns).
        traced = shape_env.backed_var_to_val if hasattr(shape_env, "backed_var_to_val") else shape_env.var_to_val
        return int(expr.subs({s: size if s in dims else traced[s] for s in expr.free_symbols}))

    args = []
    with FakeTensorMode(shape_env=ShapeEnv()):
        for value in fakes:
            if isinstance(value, torch.SymInt):
                args.append(concrete(value))
            elif isinstance(value, torch.Tensor):
                shape = [concrete(d) for d in value.shape]
                stride = [concrete(s) for s in value.stride()]
                offset = concrete(value.storage_offset())
                # Keep the storage offset: a view into a larger buffer must
                # compile to code that indexes from that offset.
                needed = offset + sum((d - 1) * s for d, s in zip(shape, stride)) + 1 if all(shape) else 0
                storage = torch.empty_strided((needed,), (1,), dtype=value.dtype, device=value.device)
                args.append(storage.as_strided(shape, stride, offset))
            else:
                args.append(value)
    return args


# =============================================================================
# 7. Graph passes (vLLM's post-grad pass manager, PRs 10273 and 24252)
#
# vLLM makes a compiled model faster than Inductor alone with passes of its
# own (RMSNorm + quant, SiLU-and-mul + quant, all-reduce + RMSNorm fusions,
# no-op elimination). They run where Inductor lets a user in, its
# post_grad_custom_post_pass: on each piece's post-grad graph (functional
# ATen, after AOTAutograd and Inductor's own passes), at every compile of
# the piece. One pass manager per compile runs, in order, the passes that
# apply to the entry it compiles (PR 24252: a fusion may pay off at some
# token counts only). A range holds sizes on both sides of such a limit, so
# a pass's range_endpoints() end compile ranges (section 1), as vLLM adds
# its fusions' limits to its own.
#
# Identity (PR 10273): code compiled with one set of passes must never be
# loaded by a start with another. The manager's uuid(), the applicable
# passes' uuids in order, is in Inductor's key and AOTAutograd's, and so in
# the in-memory key of isomorphic pieces (section 8): identical layers still
# compile once. Each pass's uuid and the entries it applies to are in the
# hash folder's factors, so a start with a pass edited, added, removed,
# reordered or applied elsewhere compiles afresh and its miss names the
# pass. A pass without uuid() gets a hash of its qualified name and source,
# computed once per pass object: vLLM hashed its passes' sources at every
# compile of every piece and range (111 ms, PR 37600). A pass whose work
# depends on anything else (its attributes, code it calls) gives a uuid().
# A warm start runs no pass: what it loads was compiled with them.
# =============================================================================


class PassError(RuntimeError):
    """A graph pass raised: neither a backed trace nor a compile without the
    cache folder would cure it, so it is raised as it is."""


_pass_uuids: dict[int, tuple[Callable, str]] = {}  # id -> (the pass, kept so that its id stays its own; uuid)


def pass_owner(graph_pass: Callable):
    """What names a pass and holds its source: the function, or the class of a callable object."""
    return graph_pass if inspect.isroutine(graph_pass) else type(graph_pass)


def pass_name(graph_pass: Callable) -> str:
    owner = pass_owner(graph_pass)
    return getattr(owner, "__qualname__", repr(owner))


def pass_uuid(graph_pass: Callable) -> str:
    if id(graph_pass) not in _pass_uuids:
        if hasattr(graph_pass, "uuid"):
            digest = str(graph_pass.uuid())
        else:
            owner = pass_owner(graph_pass)
            try:
                if isinstance(graph_pass, functools.partial):  # its source is functools', not what it does
                    raise TypeError("a functools.partial")
                source = inspect.getsource(owner)
            except (OSError, TypeError) as e:
                raise ValueError(f"vcompile: the source of graph pass {pass_name(graph_pass)} cannot be read "
                                 f"({e}) to tell its versions apart; give it a uuid() method") from e
            digest = hashlib.sha256(f"{owner.__module__}.{owner.__qualname__}\n{source}".encode()).hexdigest()[:16]
        _pass_uuids[id(graph_pass)] = (graph_pass, digest)
    return _pass_uuids[id(graph_pass)][1]


def applies(graph_pass: Callable, entry: Range) -> bool:
    return graph_pass.applies_to(entry) if hasattr(graph_pass, "applies_to") else True


def pass_endpoints(passes: list[Callable]) -> list[int]:
    return [e for graph_pass in passes if hasattr(graph_pass, "range_endpoints") for e in graph_pass.range_endpoints()]


def pass_identities(passes: list[Callable], entries: list[Range]) -> list[str]:
    """The factors' record of the passes: name, where it applies, uuid."""
    out = []
    for graph_pass in passes:
        where = [str(entry) for entry in entries if applies(graph_pass, entry)]
        where_text = "every entry" if len(where) == len(entries) else ", ".join(where) or "no entry"
        out.append(f"{pass_name(graph_pass)} on {where_text} {pass_uuid(graph_pass)}")
    return out


class PassManager(CustomGraphPass):
    """Inductor's post_grad_custom_post_pass for one compile of one piece."""

    def __init__(self, passes: list[Callable], piece: str, entry: Range):
        self.passes, self.piece, self.entry = passes, piece, entry

    def __call__(self, graph: fx.Graph) -> None:
        for graph_pass in self.passes:
            try:
                graph_pass(graph)
            except Exception as e:
                raise PassError(f"vcompile: graph pass {pass_name(graph_pass)} failed on {self.piece} compiled for "
                                f"{self.entry}: {describe(e)}") from e

    def uuid(self) -> str:
        return " ".join(pass_uuid(graph_pass) for graph_pass in self.passes)


def pass_manager(passes: list[Callable], graph: fx.GraphModule, entry: Range):
    """The config patch that runs the passes applying to entry on graph's compile."""
    passes = [graph_pass for graph_pass in passes if applies(graph_pass, entry)]
    if not passes:  # the key stays the one with no passes: such entries share Inductor's cache with them
        return contextlib.nullcontext()
    manager = PassManager(passes, graph.meta.get("vcompile_piece", "a piece"), entry)
    return torch._inductor.config.patch(post_grad_custom_post_pass=manager)


# =============================================================================
# 8. Compiler manager and the in-memory cache (vLLM PR 41023)
#
# In a decoder the pieces between two attention calls differ only in names.
# Each distinct piece is compiled once per compile entry; every later piece
# with the same AOTAutograd cache key (computed with placeholder names
# normalized away) takes the artifact already built. The key is read where
# Inductor computes it, and StopCompiling ends that compile on a hit.
#
# The bug PR 41023 fixed: the hit path returned from inside its `except`
# block and skipped the timing log at the end of compile(), so a range whose
# last piece was a hit never reported "Compiling a graph for compile range
# ... takes ... s". Here both paths leave _compile_or_reuse the same way and
# reach the same bookkeeping.
# =============================================================================


class StopCompiling(BaseException):
    """Ends an Inductor compile once its cache key shows the artifact exists.
    A BaseException, so that Inductor's own `except Exception` lets it pass."""


def inductor_compile(graph: fx.GraphModule, example_inputs: list, entry: Range) -> AOTCompiledArtifact:
    """One Inductor compile through torch's standalone entry point. aot=True
    returns an artifact that serializes to bytes and loads without the graph."""
    if not entry.is_single_size():
        # Inductor must see the ShapeEnv that made the size symbols. Left to
        # find it ("from_graph"), it looks in the piece's outputs only, and a
        # piece that returns no tensor got a fresh one that did not know the
        # token count: `KeyError: u0` at the first call of an unbacked trace.
        context = torch._guards.TracingContext(torch._guards.detect_fake_mode(example_inputs))
        with torch._guards.tracing(context):
            return torch._inductor.standalone_compile(graph, example_inputs, dynamic_shapes="from_tracing_context",
                                                      aot=True)
    fake_mode = next((a.fake_mode for a in example_inputs if isinstance(a, FakeTensor)), None)
    # Torch versions differ here. 2.13 takes the fake mode of our concrete
    # arguments; 2.11 builds a fresh one inside standalone_compile that does not
    # match them (pytorch issue 176562), so there we hand it ours by patching.
    if fake_mode is None or "fake_mode" in inspect.signature(torch._inductor.standalone_compile).parameters:
        kwargs = {"fake_mode": fake_mode} if fake_mode is not None else {}
        return torch._inductor.standalone_compile(
            graph, example_inputs, dynamic_shapes="from_example_inputs", aot=True, **kwargs)
    with patch.object(sys.modules["torch._inductor.standalone_compile"], "FakeTensorMode", lambda *a, **k: fake_mode):
        return torch._inductor.standalone_compile(graph, example_inputs, dynamic_shapes="from_example_inputs", aot=True)


def artifact_bytes(artifact: AOTCompiledArtifact) -> bytes:
    with torch._functorch.config.patch(bundled_autograd_cache=True):
        data = artifact.serialize()
    # Equal artifacts serialized to different bytes (pickle writes a string
    # once per object; a fresh compile holds equal strings as separate objects
    # where one read back from Inductor's cache shares them), so a cold save
    # stored a piece once per range. Pickled from its own unpickling, an
    # artifact's bytes depend only on what it holds; about 1 ms per artifact.
    return pickle.dumps(pickle.loads(data))


def load_artifact(data: bytes) -> AOTCompiledArtifact:
    counters.num_compiled_artifacts_loaded += 1
    # On CPU, Inductor readies a precompiled C++ header (150 MB under /tmp,
    # most of a minute of gcc on 2 cores) before it looks for a kernel's .so.
    # A load finds every .so in the hash folder, so it gets an empty header: a
    # kernel that must be rebuilt still builds, without the speed-up (the
    # .so's key does not depend on the header's path).
    with patch.object(torch._inductor.codecache, "_precompile_header", lambda *args, **kwargs: os.devnull):
        return AOTCompiledArtifact.deserialize(data)


class CompilerManager:
    """Compiles the pieces of one backend call; owns the in-memory cache."""

    def __init__(self, pieces_dir: str | None = None, shared_dir: str | None = None, wait_s: float = 300.0,
                 slots: int | None = None, passes: list[Callable] = ()):
        self.artifacts: dict[tuple[Range, str], AOTCompiledArtifact] = {}  # (entry, AOT key) -> artifact
        self.blobs: dict[int, bytes] = {}  # id(artifact) -> its bytes, serialized once
        self.seconds: dict[Range, float] = defaultdict(float)  # compile time per entry, all pieces
        self.pieces_dir = pieces_dir  # JIT mode: artifacts on disk, keyed like the in-memory cache
        self.save_pieces = pieces_dir is not None and os.access(pieces_dir, os.W_OK)  # False: a shipped cache
        self.bad_files: set[str] = set()
        self.loaded: dict[bytes, AOTCompiledArtifact] = {}  # file content hash -> artifact: load each once
        self.shared_dir = shared_dir  # None: a read-only or no cache root, compile alone
        self.wait_s = wait_s
        self.held_elsewhere: set[str] = set()  # AOT keys another process held when this one wanted them
        self.waited_s = 0.0
        self.passes = list(passes)
        self.slots = slots or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)

    def compile_all(self, jobs: list[tuple[fx.GraphModule, list, Range]]) -> list[AOTCompiledArtifact]:
        """Each (piece, example inputs, entry) job's artifact. Jobs another
        process holds are put off while others remain, then waited for in turn.
        Without a compile slot, only what others finished is taken until one
        frees (section 9)."""
        artifacts: list[AOTCompiledArtifact | None] = [None] * len(jobs)
        left = defaultdict(int)  # entry -> jobs not done: its time is logged when it reaches 0
        for _, _, entry in jobs:
            left[entry] += 1
        slot = compile_slot(self, 0) if self.shared_dir is not None else None
        take_only = slot is None and self.shared_dir is not None
        pending, wait = list(range(len(jobs))), False
        try:
            while pending:
                put_off = []
                for i in pending:
                    graph, example_inputs, entry = jobs[i]
                    started = time.perf_counter()
                    try:
                        artifacts[i] = self._compile_or_reuse(graph, example_inputs, entry, wait, take_only)
                    except PutOff:
                        put_off.append(i)
                        continue
                    finally:
                        self.seconds[entry] += time.perf_counter() - started
                        wait = False  # one wait per pass, then whatever the others finished meanwhile
                    counters.num_backend_compilations += 1
                    left[entry] -= 1
                    if left[entry] == 0:
                        logger.info("Compiling a graph for compile range %s takes %.2f s", entry, self.seconds[entry])
                if put_off and take_only:
                    slot = compile_slot(self, self.wait_s)
                    take_only = False  # with a slot, or after the bound without one
                else:
                    wait = True
                pending = put_off
        finally:
            if slot is not None:
                os.close(slot)
        return artifacts

    def compile(self, graph: fx.GraphModule, example_inputs: list, entry: Range) -> AOTCompiledArtifact:
        return self.compile_all([(graph, example_inputs, entry)])[0]

    def _compile_or_reuse(self, graph, example_inputs, entry, wait: bool = False,
                          take_only: bool = False) -> AOTCompiledArtifact:
        key, lock, found = None, None, None
        compute_key = aot_autograd_cache.autograd_cache_key

        def key_then_stop_on_hit(*args, **kwargs):
            nonlocal key, lock, found
            result = compute_key(*args, **kwargs)
            key = (entry, result[0])
            found = self._found(key)
            if found is None and take_only:
                raise PutOff
            if found is None:
                lock = lock_key(self, key, wait)
                found = self._found(key)  # left by the process that held the lock
            if found is not None:
                raise StopCompiling
            return result

        try:
            with (torch._functorch.config.patch(autograd_cache_normalize_inputs=True),
                  patch.object(aot_autograd_cache, "autograd_cache_key", key_then_stop_on_hit),
                  pass_manager(self.passes, graph, entry)):
                artifact = inductor_compile(graph, example_inputs, entry)
        except StopCompiling:
            if found == "memory":
                counters.num_inmemory_cache_hits += 1
                return self.artifacts[key]
            artifact = self._load_piece(found)
            if artifact is None:  # unreadable file: it is now in bad_files, so this compiles
                return self._compile_or_reuse(graph, example_inputs, entry, wait, take_only)
            if found == piece_path(self.shared_dir, key):
                counters.num_artifacts_from_other_processes += 1
                self._keep(key, artifact)
        else:
            counters.num_inductor_compiles += 1
            self.blobs[id(artifact)] = artifact_bytes(artifact)
            self._keep(key, artifact)
            # For the other processes on this root (section 9).
            write_piece(piece_path(self.shared_dir, key), self.blobs[id(artifact)], logger.debug)
        finally:
            if lock is not None:
                os.close(lock)  # after the bytes are shared: a waiter finds them
        if key is not None:  # None when Inductor could not key this graph: no sharing
            self.artifacts[key] = artifact
        return artifact

    def _found(self, key) -> str | None:
        """Where this key's artifact already is: "memory", or a file to load."""
        if key in self.artifacts:
            return "memory"
        piece, shared = piece_path(self.pieces_dir, key), piece_path(self.shared_dir, key)
        if piece is not None and piece not in self.bad_files and os.path.exists(piece):
            return piece
        if shared is None or shared in self.bad_files:
            return None
        with contextlib.suppress(OSError):  # absent
            written = os.path.getmtime(shared)
            if key[1] in self.held_elsewhere or written >= _started_at:
                return shared
        return None

    def _load_piece(self, path: str) -> AOTCompiledArtifact | None:
        try:
            data = read_artifact(path)
            # A piece's ranges compile to equal artifacts, and artifact_bytes gives
            # those equal bytes: load each once.
            digest = hashlib.sha256(data).digest()
            if digest not in self.loaded:
                self.loaded[digest] = load_artifact(data)
            artifact = self.loaded[digest]
        except Exception as e:
            logger.warning("Compiling model again due to a load failure from %s, reason: %s", path, e)
            self.bad_files.add(path)
            return None
        self.blobs[id(artifact)] = data
        return artifact

    def _keep(self, key, artifact) -> None:
        """JIT mode: the piece's bytes in the cache folder, for the next start."""
        data = self.blobs[id(artifact)]
        if self.save_pieces and write_piece(piece_path(self.pieces_dir, key), data, logger.warning):
            counters.num_compiled_artifacts_saved += 1


def piece_path(folder: str | None, key: tuple[Range, str] | None) -> str | None:
    """Where a piece's artifact is kept in a folder (JIT mode's, or the one
    processes share), named by its entry and AOT key."""
    if folder is None or key is None:  # None: Inductor could not key the graph
        return None
    return os.path.join(folder, hashlib.sha256(f"{key[0]} {key[1]}".encode()).hexdigest()[:32])


def write_piece(path: str | None, data: bytes, log: Callable) -> bool:
    if path is None:
        return False
    try:
        write_artifact(path, data)
        return True
    except OSError as e:  # a full disk: kept in memory only; a process that wanted it compiles it itself
        log("vcompile: could not save %s: %s", path, e)
        return False


# =============================================================================
# 9. Compiling once per machine
#
# Tensor-parallel ranks trace identical graphs, and replicas of one model
# start together on one node: each compiled every piece, on the same cores
# (8 ranks x 32 compile workers, pytorch issue 190941), and vLLM's ranks miss
# each other's cache (vLLM issue 53958). Here the processes on one cache root
# split the work by AOT key: the first to want a key holds its flock in
# <hash>/shared_pieces while it compiles, then leaves the artifact's bytes
# there. Another that wants the key meanwhile puts that piece off, compiles
# one nobody holds, and when nothing else is left waits, then loads the
# bytes: the very artifact the first one built. The lock is per AOT key, not
# per (entry, key): a piece's ranges share one key (the later ones hit
# Inductor's cache), and two processes compiling them at once would both
# lower the graph.
#
# The same bytes matter beyond the time saved: two processes that compiled a
# key at once each wrote Inductor's cache entry for it, which carries its
# writer's compile time and debugging text, and one rank stored 8 artifacts
# where the other stored 6 for the same graphs. A lone start takes no bytes
# older than itself (unless it found their key held): it compiles them as
# before, an Inductor cache hit, and counts what it always counted.
#
# At most one process per core compiles at once: a compile_all first takes
# one of `slots` flocks in shared_pieces; a process that finds them all held
# only takes what is already there, then waits for a slot. Each process that
# compiles even one piece pays Inductor's first-compile set-up (its pattern
# matchers, about a second of CPU): four processes on two cores paid it four
# times, on the cores the compiles needed.
# =============================================================================


class PutOff(BaseException):
    """Another process is compiling this piece now: compile another first."""


def _process_started_at() -> float:
    """When this process was started (Linux), else when vcompile was
    imported. Processes started together may import torch seconds apart, by
    which time another may have shared a piece that one should take."""
    with contextlib.suppress(OSError, ValueError, IndexError, StopIteration):
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks after boot
        with open("/proc/stat") as f:
            booted = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return booted + ticks / os.sysconf("SC_CLK_TCK")
    return time.time()


_started_at = _process_started_at()


def compile_slot(manager: CompilerManager, wait_s: float) -> int | None:
    """A held compile slot, or None: none came free within wait_s, or
    the root cannot be locked (then sharing is off: compile alone)."""
    started, deadline = time.perf_counter(), time.monotonic() + wait_s
    try:
        while True:
            for i in range(manager.slots):
                slot = lock_file(os.path.join(manager.shared_dir, f"compile-slot-{i}.lock"), 0)
                if slot is not None:
                    return slot
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
    except OSError as e:  # a root made read-only or full meanwhile
        logger.debug("vcompile: cannot lock %s: %s", manager.shared_dir, e)
        manager.shared_dir = None
        return None
    finally:
        if wait_s:  # a first try that finds a slot is no wait: a start alone logs nothing
            manager.waited_s += time.perf_counter() - started
    if wait_s:
        logger.warning("vcompile: waited %.0f s for one of the %d compile slots in %s; compiling here "
                       "(compile_wait_s sets the wait)", wait_s, manager.slots, manager.shared_dir)
    return None


def lock_key(manager: CompilerManager, key, wait: bool) -> int | None:
    """The AOT key's lock, or None where there is no sharing; PutOff while
    another process holds it, unless this job waits for it."""
    if manager.shared_dir is None:
        return None
    name = hashlib.sha256(key[1].encode()).hexdigest()[:32]
    try:
        started = time.perf_counter()
        lock = lock_file(os.path.join(manager.shared_dir, f"{name}.lock"), manager.wait_s if wait else 0)
        if wait:
            manager.waited_s += time.perf_counter() - started
    except OSError as e:  # a root made read-only or full meanwhile: compile alone
        logger.debug("vcompile: cannot lock %s: %s", manager.shared_dir, e)
        return None
    if lock is None and not wait:
        manager.held_elsewhere.add(key[1])
        raise PutOff
    if lock is None:
        logger.warning("vcompile: waited %.0f s for another process compiling a piece for range %s into %s; "
                       "compiling it here (compile_wait_s sets the wait)", manager.wait_s, key[0], manager.shared_dir)
    return lock


# =============================================================================
# 10. Piecewise interpreter and per-piece range dispatch (vLLM PR 35472)
#
# Before PR 35472 a piece compiled a range the first time a call landed in
# it: compiles happened in the middle of serving and the reported compile time
# missed them. Now the interpreter walks the split graph once, inside the
# backend, and compiles every piece for every entry before the backend
# returns. At run time each piece picks the artifact for the call's size.
# =============================================================================


class PieceRunner:
    """One compiled piece at run time: an artifact per compile entry, chosen
    by the size found at args[size_arg] (a SymInt) or args[size_arg].shape[size_dim]."""

    def __init__(self, name: str, fns: list[Callable], lookup: Callable[[int], int],
                 size_arg: int | None, size_dim: int | None, returns_tuple: bool,
                 capture_sizes: frozenset = frozenset(), owned: set | None = None):
        self.name, self.fns, self.lookup = name, fns, lookup
        self.size_arg, self.size_dim, self.returns_tuple = size_arg, size_dim, returns_tuple
        self.capture_sizes, self.owned = capture_sizes, owned  # section 11
        self.graphs: dict[int, tuple] = {}  # capture size -> (graph, static inputs, outputs)

    def __call__(self, *args):
        if self.size_arg is None:  # no dynamic input: every entry compiled the same graph
            out = self.fns[0](*args)
        else:
            size = args[self.size_arg] if self.size_dim is None else args[self.size_arg].shape[self.size_dim]
            fn = self.fns[self.lookup(size)]
            if size not in self.capture_sizes:
                out = fn(*args)
            else:
                if size not in self.graphs:
                    self.graphs[size] = capture(fn, args, self.owned)
                out = replay(*self.graphs[size], args)
        # A loaded artifact returns a list even when its graph returned one
        # value (a fresh one unwraps it): give back what the graph returned.
        if not self.returns_tuple and isinstance(out, (list, tuple)):
            return out[0]
        return out


def where_is_the_size(fake_args: list) -> tuple[int | None, int | None]:
    """Which argument carries the token count: a SymInt argument if the piece
    takes one, else the first tensor dimension that is a bare symbol."""
    dims = size_symbols(fake_args)
    for i, arg in enumerate(fake_args):
        if isinstance(arg, torch.SymInt) and arg.node.expr in dims:
            return i, None
    for i, arg in enumerate(fake_args):
        if isinstance(arg, torch.Tensor):
            for dim, size in enumerate(arg.shape):
                if isinstance(size, torch.SymInt) and size.node.expr in dims:
                    return i, dim
    return None, None


class PiecewiseCompileInterpreter(fx.Interpreter):
    def __init__(self, split_gm: fx.GraphModule, compile_names: list[str], entries: list[Range]):
        super().__init__(split_gm)
        self.compile_names, self.entries = compile_names, entries
        self.jobs: list[tuple[fx.GraphModule, list, Range]] = []  # for CompilerManager.compile_all
        self.compiled: dict[str, dict] = {}  # piece -> its jobs' indices and how to call it

    def call_module(self, target, args, kwargs):
        piece = getattr(self.module, target)
        if target in self.compile_names:
            piece.meta["vcompile_piece"] = target  # for a graph pass's error (section 7)
            symbolic = fake_args_from_graph(piece)
            first = len(self.jobs)
            self.jobs += [(piece, concrete_args(piece, entry.start) if entry.is_single_size() else symbolic, entry)
                          for entry in self.entries]
            self.compiled[target] = {
                "artifacts": list(range(first, len(self.jobs))),
                "size_at": where_is_the_size(symbolic),
                "returns_tuple": isinstance(piece.graph.output_node().args[0], (tuple, list)),
            }
            counters.num_piecewise_capturable_graphs_seen += 1
        # Dynamo recorded every output's fake value: reading them is cheaper
        # than running the piece, and splitting ops need no fake kernel.
        return fx.map_arg(piece.graph.output_node().args[0], lambda node: node.meta["example_value"])


# =============================================================================
# 11. Piecewise CUDA graphs (vLLM's CUDAGraphWrapper)
#
# Why vLLM splits the graph at all. A decode step launches a few kernels per
# layer, hundreds in all, and on a GPU their launches are what a small step
# costs. A CUDA graph records a piece's kernels once and replays them with
# one launch. Attention stays out (its metadata and key/value cache change
# every step), so every compiled piece between two attention calls is
# captured at each of cudagraph_capture_sizes, and the splitting ops run
# eagerly between the replays.
#
# When. vLLM's model runner captures every size at start-up with dummy
# batches: it owns the key/value cache and knows which slots a dummy may
# write. A compiler does not know which splitting op writes state, so
# vcompile captures each piece at the first real call of each capture size,
# after a warm-up run at that size (CUDA wants lazy initialization out of
# the capture): no made-up input ever reaches a splitting op. Graphs are not
# saved; a warm start captures again, and prepare() captures nothing.
#
# Static buffers. A graph replays on the addresses it was captured with. An
# input that is elsewhere at a replay (the caller's tensors, a splitting op's
# fresh output) is copied into the piece's own buffer first; weights and
# earlier graphs' outputs stay where they are and are never copied. A replay
# writes its outputs into the same memory every time, so what the model
# returns is copied out of it: a generate loop keeps every step's logits.
# No padding: a size between two capture sizes runs the pieces without
# graphs, since padding changes what a model computes unless its attention
# knows which tokens are padding, which a runner knows and a compiler does not.
#
# The graph is reached through one seam, new_graph(): torch.cuda.CUDAGraph,
# or with VCOMPILE_CUDAGRAPH_STAND_IN=1 a stand-in with the same semantics
# for what vcompile controls, so the tests run this section on a CPU.
# =============================================================================


class StandInGraph:
    """Capture runs the piece once on its static inputs and keeps its
    outputs; replay runs it again on whatever the static inputs hold and
    writes into those same output tensors. A missing input copy, or an output
    handed back and overwritten by the next replay, shows as it would on CUDA."""

    def capture(self, fn: Callable, inputs: list):
        self.fn, self.inputs = fn, inputs
        self.outputs = fn(*inputs)
        return self.outputs

    def replay(self) -> None:
        for static, fresh in zip(tensors_in(self.outputs), tensors_in(self.fn(*self.inputs))):
            static.copy_(fresh)


class CudaGraph:
    pool = None  # one memory pool for every graph in the process, as in vLLM

    def capture(self, fn: Callable, inputs: list):
        if CudaGraph.pool is None:
            CudaGraph.pool = torch.cuda.graph_pool_handle()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=CudaGraph.pool):
            return fn(*inputs)

    def replay(self) -> None:
        self.graph.replay()


def stand_in() -> bool:
    return os.environ.get("VCOMPILE_CUDAGRAPH_STAND_IN") == "1"


def new_graph() -> StandInGraph | CudaGraph:
    return StandInGraph() if stand_in() else CudaGraph()


def tensors_in(value) -> list[torch.Tensor]:
    return [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, torch.Tensor)]


def stays_put(t: torch.Tensor, owned: set) -> bool:
    """Weights, and what an earlier graph returned, are where they were at every call."""
    return isinstance(t, torch.nn.Parameter) or t.untyped_storage().data_ptr() in owned


def capture(fn: Callable, args: tuple, owned: set) -> tuple:
    """A warm-up run, then the capture: (graph, static inputs, outputs)."""
    global _capture_s
    started = time.perf_counter()
    fn(*args)
    inputs = [a.clone() if isinstance(a, torch.Tensor) and not stays_put(a, owned) else a for a in args]
    graph = new_graph()
    # torch.cuda.graph collects garbage and empties the allocator's cache
    # before each capture: seconds for every piece at every size. vLLM turns
    # both off after the first capture; so does vcompile.
    with contextlib.ExitStack() as quiet:
        if counters.num_cudagraph_captured:
            quiet.enter_context(patch("gc.collect", lambda *a: 0))
            quiet.enter_context(patch("torch.cuda.empty_cache", lambda: None))
        outputs = graph.capture(fn, inputs)
    owned.update(t.untyped_storage().data_ptr() for t in tensors_in(outputs))
    counters.num_cudagraph_captured += 1
    _capture_s += time.perf_counter() - started
    return graph, inputs, outputs


def replay(graph, inputs: list, outputs, args: tuple):
    for static, arg in zip(inputs, args):
        if isinstance(arg, torch.Tensor) and arg.data_ptr() != static.data_ptr():
            static.copy_(arg)
    graph.replay()
    return outputs


def copied_out(out, owned: set):
    """What the model returns, out of the graphs' memory: the next replay writes there."""
    return torch.utils._pytree.tree_map_only(
        torch.Tensor, lambda t: t.clone() if t.untyped_storage().data_ptr() in owned else t, out)


# The capture sizes link() gives a function's pieces: those of the model whose
# first call holds _first_call_lock (section 15), set there, since torch's
# loader calls link() with nothing of ours.
_capture_sizes: frozenset = frozenset()
_warned_no_cuda = False


@contextlib.contextmanager
def capturing(config: CompilationConfig, device: torch.device):
    global _capture_sizes, _warned_no_cuda
    sizes = frozenset(config.cudagraph_capture_sizes)
    if sizes and device.type != "cuda" and not stand_in():
        if not _warned_no_cuda:  # one script serves both machines: say it once, run without graphs
            _warned_no_cuda = True
            logger.warning("vcompile: cudagraph_capture_sizes need CUDA; the model is on %s and runs without "
                           "CUDA graphs", device)
        sizes = frozenset()
    _capture_sizes = sizes
    try:
        yield
    finally:
        _capture_sizes = frozenset()


# =============================================================================
# 12. Codegen with inlined submodules (vLLM PR 40151)
#
# The split graph is only glue: call piece 0, unpack, call attention, call
# piece 1, ... Running it as an FX GraphModule means pickling that module with
# the artifact and deserializing it (fake tensors, sympy, node metadata) at
# every warm start. Instead it is written out as one plain Python function:
#   - compiled pieces are called through a list argument, __vcompile_submods__[i];
#   - splitting-op pieces become small functions that call the ops by their
#     qualified name (torch.ops.ns.op), so no GraphModule is left to load;
#   - every value is `del`eted after its last use, freeing activations as the
#     FX graph did;
#   - constants repr() cannot rebuild (dtypes, devices, inf) go into a list,
#     __vcompile_consts__, that is pickled beside the code.
# =============================================================================


def generate_execution_code(split_gm: fx.GraphModule, compile_names: list[str]) -> tuple[str, list]:
    consts: list = []
    imports = {"torch"}

    def ref(arg) -> str:
        if isinstance(arg, fx.Node):
            return arg.name
        if isinstance(arg, tuple):
            inner = ", ".join(map(ref, arg))
            return f"({inner},)" if len(arg) == 1 else f"({inner})"
        if isinstance(arg, list):
            return "[" + ", ".join(map(ref, arg)) + "]"
        if isinstance(arg, dict):
            return "{" + ", ".join(f"{ref(k)}: {ref(v)}" for k, v in arg.items()) + "}"
        if type(arg) in (bool, int, str, type(None)) or (type(arg) is float and math.isfinite(arg)):
            return repr(arg)
        for i, const in enumerate(consts):
            if const is arg:
                return f"__vcompile_consts__[{i}]"
        consts.append(arg)
        return f"__vcompile_consts__[{len(consts) - 1}]"

    def callee(node: fx.Node) -> str:
        if node.op == "call_module":
            if node.target in compile_names:
                return f"__vcompile_submods__[{compile_names.index(node.target)}]"
            return f"_inlined_{node.target}"
        name = fx.node._get_qualified_name(node.target)
        imports.add(name.split(".")[0])
        return name

    inlined = [
        _function_source(getattr(split_gm, name).graph, f"_inlined_{name}", ref, callee)
        for name, _ in split_gm.named_children() if name not in compile_names
    ]
    main = _function_source(split_gm.graph, "execution_fn", ref, callee, keyword_params="*, __vcompile_submods__")
    header = [
        "# Generated by vcompile: runs the split graph without FX.",
        f"# __vcompile_submods__[i] runs compiled piece i: {', '.join(compile_names)}",
        f"# __vcompile_consts__ is bound at load: {consts!r}",
        *sorted(f"import {m}" for m in imports),
    ]
    return "\n\n\n".join(["\n".join(header), *inlined, main]) + "\n", consts


def _function_source(graph: fx.Graph, name: str, ref: Callable, callee: Callable, keyword_params: str = "") -> str:
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    dead_after: dict[int, list[str]] = defaultdict(list)
    for node in nodes:
        if node.users:
            last = max(node.users, key=position.__getitem__)
            if last.op != "output":  # returning is the last use; no del needed
                dead_after[position[last]].append(node.name)
    params, body = [], []
    for i, node in enumerate(nodes):
        if node.op == "placeholder":
            params.append(node.name)
            continue
        if node.op == "output":
            body.append(f"    return {ref(node.args[0])}")
            continue
        if node.op == "call_function" and node.target is operator.getitem:
            body.append(f"    {node.name} = {ref(node.args[0])}[{ref(node.args[1])}]")
        elif node.op in ("call_function", "call_module"):
            args = [ref(a) for a in node.args] + [f"{k}={ref(v)}" for k, v in node.kwargs.items()]
            body.append(f"    {node.name} = {callee(node)}({', '.join(args)})")
        else:
            raise NotImplementedError(f"vcompile codegen cannot emit {node.format_node()}")
        if i in dead_after:
            body.append(f"    del {', '.join(sorted(dead_after[i]))}")
    params_source = ", ".join(params + ([keyword_params] if keyword_params else []))
    return "\n".join([f"def {name}({params_source}):", *body])


def bind_execution_code(code: str, consts: list, submods: list[Callable]) -> Callable:
    namespace = {"__vcompile_consts__": consts}
    exec(builtins.compile(code, "<vcompile execution code>", "exec"), namespace)  # compile() is ours here
    return functools.partial(namespace["execution_fn"], __vcompile_submods__=submods)


# =============================================================================
# 13. Serializable compiled function: save and load (vLLM PR 40151)
#
# What the backend returns, and what torch's AOT entry point saves. It holds
# everything needed to rebuild the callable in another process: the compile
# entries, each piece's artifact per entry (by content hash), each unique
# artifact once, and the execution code with its constants. Loading reads the
# unique artifacts, execs the code and binds: no Dynamo, no Inductor, no FX.
# With use_codegen=False the split graph is pickled and deserialized instead,
# as before PR 40151, to measure what that costs.
# =============================================================================

_STATE_FIELDS = ("format", "entries", "size_at", "size_guards", "size_table", "pieces", "blobs", "code", "consts",
                 "submod_names", "split_graph")


class VcompileFunction(SerializableCallable):
    def __init__(self, state: dict, call: Callable):
        self.state, self.call = state, call

    def __call__(self, *args):
        return self.call(*args)

    @classmethod
    def serialize_compile_artifacts(cls, fn: VcompileFunction) -> bytes:
        return pickle.dumps(fn.state, protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def deserialize_compile_artifacts(cls, data: bytes) -> VcompileFunction:
        state = pickle.loads(data)
        missing = [f for f in _STATE_FIELDS if f not in state]
        if missing or state["format"] != FORMAT_VERSION:
            raise ValueError(f"saved by another vcompile version (format {state.get('format')}, missing {missing})")
        # One load per unique artifact, however many pieces and entries share it.
        loaded = {digest: load_artifact(blob) for digest, blob in state["blobs"].items()}
        return cls(state, link(state, loaded))


def link(state: dict, artifacts: dict[str, Callable], split_gm: fx.GraphModule | None = None) -> Callable:
    """Builds the callable from saved state. The cold path runs through here
    too, so a warm start executes exactly what the cold start executed."""
    entries = [Range(*e) for e in state["entries"]]
    lookup = entry_lookup(entries, state["size_guards"], state["size_table"])
    capture_sizes, owned, captured, one_at_a_time = _capture_sizes, set(), set(), threading.Lock()  # section 11
    runners = {name: PieceRunner(name, [artifacts[d] for d in piece["artifacts"]], lookup, *piece["size_at"],
                                 piece["returns_tuple"], capture_sizes, owned)
               for name, piece in state["pieces"].items()}
    if state["code"] is not None:
        run = bind_execution_code(state["code"], state["consts"], [runners[n] for n in state["submod_names"]])
    else:
        if split_gm is None:
            split_gm = load_split_graph(state["split_graph"])
        for name, runner in runners.items():
            split_gm.__dict__[name] = runner  # shadows the FX submodule of the same name
        run = split_gm.forward
    size_arg, size_dim = state["size_at"]

    def checked(*args):
        size = args[size_arg] if size_dim is None else args[size_arg].shape[size_dim]
        # Before anything runs: a splitting op (an attention writing its
        # key/value cache) may come before the first compiled piece.
        lookup(size)
        if size not in capture_sizes:
            return run(*args)
        with one_at_a_time:  # a graph's static buffers serve one call at a time, whatever the thread
            if size in captured:
                return copied_out(run(*args), owned)
            count, started = counters.num_cudagraph_captured, _capture_s
            out = copied_out(run(*args), owned)
            captured.add(size)
            logger.info("Captured %d pieces as CUDA graphs at size %d in %.2f s",
                        counters.num_cudagraph_captured - count, size, _capture_s - started)
            return out

    return checked


def dump_split_graph(split_gm: fx.GraphModule) -> bytes:
    from torch.fx._graph_pickler import GraphPickler, Options

    reduce = GraphPickler.reducer_override

    def reduce_without_fake_mode(pickler, obj):
        # A fake mode holds weak references that cannot be pickled; the loaded
        # graph gets a fresh one.
        return (type(None), ()) if isinstance(obj, FakeTensorMode) else reduce(pickler, obj)

    for gm in [split_gm, *split_gm.children()]:
        for node in gm.graph.nodes:  # Dynamo's bookkeeping metadata does not pickle
            node.meta = {k: v for k, v in node.meta.items() if k == "example_value"}
    with patch.object(GraphPickler, "reducer_override", reduce_without_fake_mode):
        return GraphPickler.dumps(split_gm, Options(ops_filter=None))


def load_split_graph(data: bytes) -> fx.GraphModule:
    from torch.fx._graph_pickler import GraphPickler

    counters.num_fx_graph_deserializations += 1
    split_gm = GraphPickler.loads(data, FakeTensorMode(shape_env=ShapeEnv()))
    split_gm.recompile()
    return split_gm


# The AOT artifact, <rank dir>/model: torch's saved function, what the save
# cannot carry (section 19), and the CPU vector ISA its kernels were built
# for, in one file checked by sha256 like every artifact.


def save_aot_artifact(cache: CacheDir, aot_fn, model: torch.nn.Module, installed: dict[str, Any],
                      device: torch.device, state: dict, trace: int = 0) -> bool:
    """Saves the whole compiled function. False when it cannot be saved so
    that it loads back, ever; the model is marked to run the JIT way."""
    path = cache.trace_path(trace)
    try:
        os.makedirs(cache.rank_dir, exist_ok=True)  # torch writes a temporary file there; the folder may be pruned
        tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.raw"
        try:
            aot_fn.save_compiled_function(tmp, external_data=external_refs(model))
            with open(tmp, "rb") as f:
                payload = f.read()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        saved = {
            "aot": payload,
            "modules": {name: v.__name__ for name, v in installed.items() if inspect.ismodule(v)},
            "vec_isa": picked_vec_isa(device),
            # Which sizes this trace runs and why the others fail, read
            # before the next trace is loaded or made (section 17).
            "size_table": state["size_table"],
            "size_guards": state["size_guards"],
            "traced": state["traced"],
        }
        check_loadable(saved, model, installed)
        write_artifact(path, pickle.dumps(saved, protocol=pickle.HIGHEST_PROTOCOL))
        if state["code"] is not None:  # for people to read; never loaded
            write_atomically(f"{path}.py", state["code"].encode())
    except OSError as e:  # a full or vanishing disk: the next start may save
        logger.warning("vcompile: could not save the compiled model to %s: %s", path, e)
        return True
    except Exception as e:  # anything else comes back at every start: never let it stop the model
        mark_aot_unavailable(cache, model, aot_fn, describe(e))
        return False
    counters.num_aot_artifacts_saved += 1
    counters.num_compiled_artifacts_saved += len(state["blobs"])
    logger.info("Saved the compiled model to %s", path)
    return True


def load_aot_artifact(cache: CacheDir, model: torch.nn.Module, device: torch.device, factors: dict,
                      trace: int = 0):
    """(torch's loaded function, the vector ISA its kernels were built for,
    what was saved beside it), or None: nothing saved for this hash yet, or a
    file that cannot be used (damaged, foreign, stale), which this start
    compiles again and replaces."""
    path = cache.trace_path(trace)
    force = os.environ.get("VCOMPILE_FORCE_AOT_LOAD") == "1" and trace == 0
    if not force and not os.path.exists(path):
        if trace == 0:
            record_cold_start(cache, factors)
        return None
    try:
        saved = pickle.loads(read_artifact(path))
        with known_vec_isa(device, saved["vec_isa"]):
            aot_fn = load_aot_function(saved, model, type(model).forward.__globals__)
        check_sources_unchanged(source_hashes(aot_fn.source_info()))
    except Exception as e:
        if force:
            raise RuntimeError(f"vcompile: cannot load {path} ({describe(e)}) and VCOMPILE_FORCE_AOT_LOAD=1") from e
        logger.warning("Compiling model again due to a load failure from %s, reason: %s", path, describe(e))
        return None
    counters.num_aot_artifacts_loaded += 1
    logger.info("Loaded the compiled model from %s", path)
    mark_loaded(cache)
    aot_fn.disable_guard_check()  # guards were filtered out at compile time: skip checking the empty set per call
    return aot_fn, saved["vec_isa"], saved


@contextlib.contextmanager
def known_vec_isa(device: torch.device, saved_isa: dict | None):
    """Skips Inductor's CPU vector-ISA probe: g++ and a Python subprocess per
    candidate ISA and extension (AVX-512 BF16, VNNI, AMX), in every process
    that loads a CPU kernel, 0.3-0.8 s on torch 2.13, 5-7 s on 2.11. The
    cache key names the processor, so the cold compile proved which flags
    build and load here: each check answers from them. (config.cpp.vec_isa_ok
    is not enough: torch 2.11 to 2.15 run the extension checks anyway.) The
    CPU's feature flags still pick the candidates: a machine that lacks what
    the cold one had picks a smaller ISA and Inductor builds for it."""
    if device.type != "cpu" or saved_isa is None:
        yield
        return
    from torch._inductor import cpu_vec_isa

    proven = set(saved_isa["flags"].split())

    def check_build_as_proven(isa, code) -> bool:
        return set(isa.build_arch_flags().split()) <= proven

    with patch.object(cpu_vec_isa.VecISA, "check_build", check_build_as_proven):
        yield


def picked_vec_isa(device: torch.device) -> dict | None:
    """The ISA Inductor builds CPU kernels for, and the compiler flags it
    implies (extensions included): what a warm load on this processor trusts."""
    if device.type != "cpu":
        return None
    from torch._inductor import cpu_vec_isa

    isa = cpu_vec_isa.pick_vec_isa()
    return {"name": str(isa), "flags": isa.build_arch_flags()}


def shared_vec_isa(cache: CacheDir, device: torch.device, wait_s: float) -> None:
    """picked_vec_isa for the cold starts on one writable root, probed once:
    the first holds a lock while it probes (a second of CPU on torch 2.13,
    paid four times by four cold starts on two cores) and leaves its answer
    in shared_pieces for the others. As for the pieces (section 9), an
    answer older than this process is not taken."""
    if device.type != "cpu":
        return
    path = os.path.join(cache.shared_dir, "vec_isa")
    try:
        lock = lock_file(f"{path}.lock", wait_s)
    except OSError:  # a root made read-only or full meanwhile: probe alone
        lock = None
    try:
        answer = None
        with contextlib.suppress(OSError, ValueError):
            if os.path.getmtime(path) >= _started_at:
                answer = json.loads(read_artifact(path))
        if not (isinstance(answer, dict) and isinstance(answer.get("flags"), str)):
            answer = None  # written by another vcompile, or not an answer: probe
        with known_vec_isa(device, answer):
            isa = picked_vec_isa(device)
        if answer is None and lock is not None:
            with contextlib.suppress(OSError):
                write_artifact(path, json.dumps(isa).encode())
    finally:
        if lock is not None:
            os.close(lock)


def source_hashes(source_info) -> dict[str, str]:
    """The AOT artifact records each file Dynamo traced, whole."""
    return {s.module: hashlib.sha256(s.content.encode()).hexdigest() for s in source_info.inlined_sources}


def check_sources_unchanged(hashes: dict[str, str]) -> None:
    """A file that changed since it was traced means a stale graph: refuse
    it, and the caller recompiles."""
    for module_name, digest in sorted(hashes.items()):
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
        if hashlib.sha256(inspect.getsource(module).encode()).hexdigest() != digest:
            raise ValueError(f"source file {inspect.getsourcefile(module)} changed since it was compiled")


# =============================================================================
# 14. The backend
#
# What Dynamo calls with the graph it traced: split it (section 5), compile
# every piece for every entry (6 to 10), write the execution code (12), and
# return the serializable function (13). It runs once per trace: in AOT mode
# at a cold start only, in JIT mode at every start, where the compiler
# manager loads each piece from the cache folder instead of compiling it.
# =============================================================================


def backend(gm: fx.GraphModule, example_inputs: list, *, config: CompilationConfig,
            is_encoder: bool = False, pieces_dir: str | None = None,
            shared_dir: str | None = None, serves: list[bool] | None = None) -> VcompileFunction:
    counters.num_graphs_seen += 1
    taken_before = counters.num_artifacts_from_other_processes
    logger.info("Dynamo bytecode transform time: %.2f s", time.perf_counter() - _compile_started_at)
    fakes = fake_args_from_graph(gm)
    if not any(isinstance(d, torch.SymInt) for t in fakes if isinstance(t, torch.Tensor) for d in t.shape):
        raise RuntimeError("vcompile: no input dimension stayed dynamic through tracing; the model "
                           "specialized the token dimension (check dynamic_arg_dims)")

    guards = size_guards(fakes)  # Dynamo's alone: before any compile adds others
    traced = "unbacked" if any(symbol_is_type(s, SymT.UNBACKED_INT) for s in size_symbols(fakes)) else "backed"
    split_gm, pieces = split_graph(gm, config.splitting_ops)
    if serves is None:  # the first trace; later ones call the same ops
        warn_uncalled_splitting_ops(gm, config.splitting_ops)
    counters.num_piecewise_graphs_seen += len(pieces)
    compile_names = [name for name, is_splitting in pieces if not is_splitting]
    entries = compile_entries(config, is_encoder)
    table = size_table(entries, guards, config.max_num_batched_tokens, serves)
    if serves is not None:  # a later trace compiles only the entries that run its sizes
        used = sorted({index for index in table if index >= 0})
        if not used:
            raise ValueError(f"its guards ({' and '.join(t for t, _ in guards)}) hold at none of those sizes")
        entries = [entries[index] for index in used]
        table = [used.index(index) if index >= 0 else index for index in table]
        counters.num_extra_traces += 1
    interpreter = PiecewiseCompileInterpreter(split_gm, compile_names, entries)
    interpreter.run(*fakes)
    manager = CompilerManager(pieces_dir, shared_dir, config.compile_wait_s, passes=config.passes)
    compiled = manager.compile_all(interpreter.jobs)
    taken = counters.num_artifacts_from_other_processes - taken_before
    if taken or manager.waited_s:
        logger.info("vcompile: %d of %d piece compiles were done by other processes on this cache root "
                    "(%.1f s waiting for them), %d here", taken, len(compiled), manager.waited_s, len(compiled) - taken)

    blobs, live, pieces_state = {}, {}, {}
    for name, piece in interpreter.compiled.items():
        digests = []
        for artifact in (compiled[i] for i in piece["artifacts"]):  # content hash: identical ones stored once
            data = manager.blobs[id(artifact)]
            digest = hashlib.sha256(data).hexdigest()
            blobs[digest], live[digest] = data, artifact
            digests.append(digest)
        pieces_state[name] = {**piece, "artifacts": digests}
    state = {"format": FORMAT_VERSION, "entries": [(e.start, e.end) for e in entries],
             "size_at": where_is_the_size(fakes), "size_guards": guards, "size_table": table, "traced": traced,
             "pieces": pieces_state, "blobs": blobs, "submod_names": compile_names,
             "code": None, "consts": [], "split_graph": None}
    if config.use_codegen:
        state["code"], state["consts"] = generate_execution_code(split_gm, compile_names)
    else:
        state["split_graph"] = dump_split_graph(split_gm)
    # Counted once it compiled: an unbacked attempt that failed is traced again (section 16).
    counters.num_unbacked_traces += traced == "unbacked"
    counters.num_backed_traces += traced == "backed"
    return VcompileFunction(state, link(state, live, split_gm))


# =============================================================================
# 15. The first call: load, or compile and save, or trace (JIT)
#
# compile() only wraps the model. Its first call does the work, under the
# monitor and inside the cache folder, in one of three ways:
#   - load (AOT, warm): torch.compiler.load_compiled_function rebuilds the
#     saved function, with no Dynamo trace and no Inductor compile;
#   - compile and save (AOT, cold): torch's AOT entry point traces once and
#     calls the backend, and the function it returns is saved whole;
#   - trace (JIT: use_aot=False, or a model whose artifact cannot load back):
#     Dynamo traces at every start, and the backend loads each piece saved
#     by an earlier start instead of compiling it.
# Later calls check their inputs against what was compiled, and run. How the
# model is traced, the traces for sizes the first one excludes, and doing it
# all before the first call are sections 16 to 18.
# =============================================================================


def compile(model: torch.nn.Module, config: CompilationConfig, *,
            dynamic_arg_dims: dict[str, int] | None = None, is_encoder: bool = False) -> CompiledModel:
    """Returns a callable with the model's forward signature. Its first call
    loads from the cache or compiles everything; later calls only run. What
    is compiled, saved and loaded is the class's forward: one set on the
    instance afterwards, that calls the compiled model (transformers'
    generate() recipe in bench.py), changes none of it."""
    if "forward" in vars(model):
        # What is compiled and saved is the class's forward, called with the
        # model first (see traceable): one set on the instance, as
        # accelerate's hooks set it, would be passed over in silence.
        raise ValueError(f"vcompile: this {type(model).__name__} has a forward of its own, set on the "
                         "instance (as accelerate's hooks set one); vcompile compiles the class's forward. "
                         "Remove it (accelerate.hooks.remove_hook_from_module) or compile a module whose "
                         "forward calls this model")
    check_config(config, is_encoder)
    return CompiledModel(model, config, dynamic_arg_dims, is_encoder)


def check_config(config: CompilationConfig, is_encoder: bool) -> None:
    """Settings that would do nothing, said before anything compiles: each
    looked like it worked, and only a slow model or `python -m vcompile cache`
    told otherwise."""
    entries, top = compile_entries(config, is_encoder), config.max_num_batched_tokens
    for size in config.cudagraph_capture_sizes:
        if entry_of(size, entries, lambda size: True) == OUTSIDE_EVERY_ENTRY:
            raise outside_every_entry(size, entries, "capture size")
    beyond = sorted(size for size in set(config.compile_sizes) if size > top)
    if beyond and not is_encoder:  # an encoder's last range has no end
        raise ValueError(f"vcompile: compile_sizes {beyond} are above max_num_batched_tokens {top}, the most "
                         "tokens a call may have; raise max_num_batched_tokens or drop them")
    beyond = sorted(e for e in set(config.compile_ranges_endpoints) if e > top)
    if beyond:
        logger.warning("vcompile: compile_ranges_endpoints %s are above max_num_batched_tokens %d and end no "
                       "range", beyond, top)
    for graph_pass in config.passes:
        if not any(applies(graph_pass, entry) for entry in entries):
            logger.warning("vcompile: graph pass %s applies to none of the compile entries %s and will never "
                           "run; give it range_endpoints(), the token counts where it starts or stops applying, "
                           "or add them to compile_ranges_endpoints", pass_name(graph_pass),
                           ", ".join(map(str, entries)))


_CONSTANT_TYPES = (bool, int, float, str, type(None))  # arguments Dynamo bakes into the graph, checked per call

# Dynamo and Inductor are not thread-safe (pytorch issue 168042): two threads
# tracing at once fail inside Dynamo ("CURRENT_PATCHER is None"). Every first
# call in the process holds this lock; reentrant, for a compiled model whose
# forward calls another one. Later calls take no lock.
_first_call_lock = threading.RLock()
_NOT_RUN = object()


class CompiledModel:
    """What compile() returns: call it as you would call the model."""

    def __init__(self, model: torch.nn.Module, config: CompilationConfig,
                 dynamic_arg_dims: dict[str, int] | None, is_encoder: bool):
        self.model, self.config, self.is_encoder = model, config, is_encoder
        self.dynamic_arg_dims = dynamic_arg_dims
        self.__signature__ = inspect.signature(model.forward)
        self.fn: Callable | None = None  # set by the first call that succeeds
        self.input_specs: dict[str, tuple] = {}  # argument -> (dtype, ndim, device) compiled for
        self.constants: dict[str, Any] = {}  # non-tensor argument -> the value traced into the graph
        self.compiled_fn: VcompileFunction | None = None  # what the backend returned (cold only)
        self.cache: CacheDir | None = None
        self.factors: dict = {}  # what the cache hash is made of
        self.device: torch.device | None = None
        self.first_run_isa: dict | None = None  # prepare() loaded the AOT function; the run that loads kernels is due
        self.first_run_due = False
        self.preparing: threading.Thread | None = None  # prepare(background=True)
        self.prepare_error: BaseException | None = None
        self.untraced: list[int] = []  # sizes refused because the model reached max_traces
        self.cache_failed = False  # a compile into the cache folder failed: compile without it

    def __call__(self, *args, **kwargs):
        with torch.no_grad():  # inference: the pieces are compiled without a backward
            if self.fn is None or self.first_run_due:
                out = self._first(args, kwargs)
                if out is not _NOT_RUN:
                    return out
            check_inputs(self, args, kwargs)
            return self.fn(*args, **kwargs)

    def prepare(self, *args, background: bool = False, **kwargs) -> None:
        """Compiles or loads everything the first call would, for example
        inputs of the first call's kinds (any size, dtypes, devices and
        non-tensor arguments as the calls will have), and runs nothing: the
        weights' values are not read, so they may be loaded meanwhile. With
        background=True the work runs on a thread and prepare returns at once;
        the first call waits for it and raises what it raised. (JIT mode
        cannot trace without running: there the example inputs run once.)"""
        start_up(self, args, kwargs, background)  # section 18

    def _first(self, args, kwargs, run: bool = True):
        """The first call, a prepare(), or the first run after a prepare();
        _NOT_RUN when nothing ran (a prepare, or another thread did it all)."""
        if self.preparing is not None and self.preparing is not threading.current_thread():
            self.preparing.join()
            self.preparing, error, self.prepare_error = None, self.prepare_error, None
            if error is not None:
                raise error
        with _first_call_lock:
            if self.fn is None:  # a thread that waited finds it set
                # The whole first call: computing the cache key and entering
                # the cache folder import Inductor's runtime (1 s on CPU on
                # torch 2.15), the first run loads kernels; a total that
                # started at the load, or stopped there, would hide them.
                with monitor_torch_compile(self.config, self.is_encoder), private_files():
                    try:
                        return self._first_call(args, kwargs, run)
                    except Exception as e:
                        if not self.cache_failed:
                            raise
                        # A full disk or a quota, and no cache problem may stop
                        # the model: once more without the folder, saving
                        # nothing; a compile that fails on its own fails again.
                        logger.warning("vcompile: compiling into the cache folder %s failed (%s); compiling again "
                                       "without the cache, saving nothing", self.cache.hash_dir, describe(e))
                        return self._first_call(args, kwargs, run)
            if run and self.first_run_due:
                check_inputs(self, args, kwargs)  # against what prepare() was given
                with inductor_cache_dir(self.cache):
                    return self._first_run(args, kwargs)
        return _NOT_RUN

    def _first_run(self, args, kwargs):
        self.first_run_due = False
        with known_vec_isa(self.device, self.first_run_isa):
            return self.fn(*args, **kwargs)  # kernels load into the cache folder

    def _first_call(self, args, kwargs, run: bool = True):
        dims = bind_first_call(self, args, kwargs)
        cold = self.cache is not None and not os.path.isfile(self.cache.model_path) and not self.cache.has_pieces()
        if cold and self.cache.writable:
            # The vector-ISA probe, before anything is written into the cache
            # folder: a probe that failed there partway (a full disk) left its
            # choice half made on torch 2.13 (kernels for 256-bit vectors built
            # with AVX-512 flags: wrong outputs, then a corrupted heap).
            shared_vec_isa(self.cache, self.device, self.config.compile_wait_s)
        with inductor_cache_dir(self.cache), capturing(self.config, self.device):
            if not self.config.use_aot or aot_unavailable(self.cache) is not None:
                return self._trace(args, kwargs, dims)
            first = self._load_or_compile(args, kwargs, dims)
            if first is None:  # cannot be saved to load back: this once, compile the JIT way too
                return self._trace(args, kwargs, dims)
            later = later_traces(self, first, lambda *trace: self._load_or_compile(args, kwargs, dims, *trace))
            self.fn = dispatch(self, [first, *later], dims)
            self.first_run_isa, self.first_run_due = first["isa"], True
            return self._first_run(args, kwargs) if run else _NOT_RUN

    def _load_or_compile(self, args, kwargs, dims, trace: int = 0, at_size: int | None = None,
                         serves: list[bool] | None = None) -> dict | None:
        """One trace's AOT function, loaded or compiled and saved, with its
        size table and guards; None when it cannot be saved to load back."""
        loaded = load_aot_artifact(self.cache, self.model, self.device, self.factors, trace) if self.cache else None
        if loaded is not None:
            aot_fn, isa, saved = loaded
            return one_trace(aot_fn, saved, loaded=True, isa=isa)
        aot_fn = self._compile_and_save(args, kwargs, dims, trace, at_size, serves)
        return one_trace(aot_fn, self.compiled_fn.state, loaded=False) if aot_fn is not None else None

    def _compile_and_save(self, args, kwargs, dims, trace: int = 0, at_size: int | None = None,
                          serves: list[bool] | None = None, pieces_dir: str | None = None):
        """The AOT function, traced once and saved; None when it cannot be
        saved so that it loads back (section 19). A later trace is traced
        backed at `at_size` and compiled for the sizes it `serves`. JIT
        mode's later traces pass its `pieces_dir` and save no function."""
        module_globals = set(type(self.model).forward.__globals__)

        def aot_compile(unbacked: bool):
            compiled, trace_args, trace_kwargs = traceable(self, args, kwargs, dims, unbacked, at_size, pieces_dir,
                                                           serves)
            self.compiled_fn = None  # set by the backend: then any failure is torch's, wrapping its result
            with _tracing_patches():
                return compiled.aot_compile(((self.model, *trace_args), trace_kwargs))

        try:
            aot_fn = unbacked_else_backed(self, aot_compile) if trace == 0 else aot_compile(unbacked=False)
        except Exception as e:
            if self.compiled_fn is None or trace > 0:  # the model itself failed to trace or compile
                raise
            # The backend finished; torch failed to wrap its result for saving.
            mark_aot_unavailable(self.cache, self.model, None, describe(e))
            return None
        counters.num_aot_compiles += 1
        aot_fn.disable_guard_check()  # as a loaded one
        if self.cache is None or not self.cache.writable or pieces_dir is not None:
            return aot_fn
        if trace == 0:
            record_factors(self.cache, traced=self.compiled_fn.state["traced"],
                         backed_because=self.compiled_fn.state.get("backed_because"))
        installed = installed_globals(aot_fn, module_globals)
        saved = save_aot_artifact(self.cache, aot_fn, self.model, installed, self.device, self.compiled_fn.state,
                                  trace)
        return aot_fn if saved else None

    def _trace(self, args, kwargs, dims):
        """JIT mode: Dynamo traces, and the backend compiles each piece, or
        loads it from the cache folder where an earlier start saved it."""
        warm = self.cache is not None and self.cache.has_pieces()
        if not self.config.use_aot and self.cache is not None and not warm:
            record_cold_start(self.cache, self.factors)
        pieces_dir = self.cache.pieces_dir if self.cache is not None else None

        def trace_and_run(unbacked: bool):
            compiled, trace_args, trace_kwargs = traceable(self, args, kwargs, dims, unbacked, pieces_dir=pieces_dir)
            with _tracing_patches():
                # Dynamo traces, the backend compiles or loads every piece, then
                # the call runs: in JIT mode they cannot be separated.
                out = compiled(self.model, *trace_args, **trace_kwargs)
            # A one-token call traced at two runs again as itself (its size may fail a guard).
            return compiled, out, not unbacked and traced_at_two(self.__signature__, args, kwargs, dims, self.config)

        compiled, out, rerun = unbacked_else_backed(self, trace_and_run)
        state = self.compiled_fn.state
        first = one_trace(compiled, state, loaded=False)
        # Later traces go through the AOT entry point, which traces without
        # running the model: a run at a made-up size would write a key/value
        # cache. Kept in memory; their pieces are saved and loaded as above.
        def later_trace(trace: int, at: int, serves: list[bool]) -> dict:
            aot_fn = self._compile_and_save(args, kwargs, dims, trace, at, serves, pieces_dir)
            return one_trace(aot_fn, self.compiled_fn.state, loaded=False)  # the state this trace's backend set

        later = later_traces(self, first, later_trace)
        self.fn = dispatch(self, [first, *later], dims)
        if self.cache is not None and not warm:
            record_factors(self.cache, traced=state["traced"], backed_because=state.get("backed_because"))
        if warm:
            mark_loaded(self.cache)
        return self.fn(*args, **kwargs) if rerun else out


def bind_first_call(compiled: CompiledModel, args, kwargs) -> dict[str, int]:
    """Checks the first call's inputs, records what later calls must
    match, and opens the cache folder for them. Returns the dynamic dims."""
    arguments = bound_arguments(compiled.__signature__, args, kwargs)
    tensors = {n: v for n, v in arguments.items() if isinstance(v, torch.Tensor)}
    dims = compiled.dynamic_arg_dims if compiled.dynamic_arg_dims is not None else {n: 0 for n in tensors}
    for name, dim in dims.items():
        if name not in tensors or not -tensors[name].dim() <= dim < tensors[name].dim():
            raise ValueError(f"vcompile: dynamic_arg_dims names {name}:{dim}, which is not a "
                             f"dimension of a tensor argument of {type(compiled.model).__name__}.forward")
    if not dims:
        raise ValueError("vcompile: no tensor argument to make dynamic")
    entries = compile_entries(compiled.config, compiled.is_encoder)
    for name, dim in dims.items():  # before any compile work, not after it
        find_entry(tensors[name].shape[dim], entries)
    compiled.input_specs = {n: (v.dtype, v.dim(), v.device) for n, v in tensors.items()}
    compiled.constants = {n: v for n, v in arguments.items() if type(v) in _CONSTANT_TYPES}
    compiled.device = next(compiled.model.parameters(), next(iter(tensors.values()))).device
    compiled.factors = cache_key_factors(compiled.model, compiled.config, compiled.is_encoder, dims, compiled.device)
    compiled.cache = None if compiled.cache_failed else open_cache_dir(compiled.factors, compiled.config)
    return dims


def traceable(compiled: CompiledModel, args, kwargs, dims, unbacked: bool, at_size: int | None = None,
              pieces_dir: str | None = None, serves: list[bool] | None = None):
    """torch.compile's wrapper of the forward, and the inputs to trace it
    with (section 16). Dynamo's share of the time counts from here."""
    global _compile_started_at

    def backend_of_this_trace(gm, example_inputs):
        writable = compiled.cache is not None and compiled.cache.writable
        try:
            compiled.compiled_fn = backend(gm, example_inputs, config=compiled.config, is_encoder=compiled.is_encoder,
                                           pieces_dir=pieces_dir, serves=serves,
                                           shared_dir=compiled.cache.shared_dir if writable else None)
        except Exception as e:
            if writable and cause_of(e, PassError) is None:  # compiling into the folder failed (see _first)
                compiled.cache_failed = True  # a flag: the exception's traceback would keep the graph alive
            raise
        return compiled.compiled_fn

    # The forward as a plain function, called with the model first, as a
    # saved function is: as a bound method, a forward torch defines
    # (nn.Sequential's) is wrapped by Dynamo in a closure that holds the
    # model, which then failed at its first run. enable_aot_compile gives
    # the wrapper its .aot_compile(); on by default from torch 2.13.
    with torch._dynamo.config.patch(enable_aot_compile=True):
        wrapper = torch.compile(
            type(compiled.model).forward, fullgraph=True, dynamic=False, backend=backend_of_this_trace,
            # The graph is traced once and never re-checked: guards would only
            # cost time per call, and a failed one would mean a recompile.
            options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe})
    trace_args, trace_kwargs = trace_inputs(compiled.__signature__, args, kwargs, dims, compiled.config, unbacked,
                                            at_size)
    _compile_started_at = time.perf_counter()
    return wrapper, trace_args, trace_kwargs


def check_inputs(compiled: CompiledModel, args, kwargs) -> None:
    # Dynamo's guards are dropped (the graph must never be traced again), so
    # nothing else would notice a tensor the artifacts were not built for,
    # or a flag such as use_cache that was traced into the graph as a constant.
    arguments = bound_arguments(compiled.__signature__, args, kwargs)
    for name, (dtype, ndim, device) in compiled.input_specs.items():
        value = arguments.get(name)
        if not isinstance(value, torch.Tensor) or (value.dtype, value.dim(), value.device) != (dtype, ndim, device):
            got = (f"a {value.dim()}-d {value.dtype} tensor on {value.device}"
                   if isinstance(value, torch.Tensor) else type(value).__name__)
            raise TypeError(f"vcompile: argument '{name}' was compiled for a {ndim}-d {dtype} "
                            f"tensor on {device}; got {got}")
    for name, traced in compiled.constants.items():
        value = arguments.get(name)
        if type(value) is not type(traced) or value != traced:
            got = repr(value) if type(value) in _CONSTANT_TYPES else f"a {type(value).__name__}"
            raise ValueError(f"vcompile: argument '{name}' was compiled as {traced!r}; got {got} "
                             "(non-tensor arguments are constants of the traced graph)")


def bound_arguments(signature: inspect.Signature, args, kwargs) -> dict[str, Any]:
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def one_trace(fn: Callable, saved: dict, loaded: bool, isa: dict | None = None) -> dict:
    """One trace of the model: its function (AOT, or JIT mode's first), and
    the size table, guards and kind of trace it was saved with (None: saved
    before vcompile made later traces; it runs the sizes it ran then)."""
    return {"fn": fn, "isa": isa, "table": saved.get("size_table"), "guards": saved.get("size_guards"),
            "traced": saved.get("traced"), "loaded": loaded}


# =============================================================================
# 16. How the token count is traced (vLLM PR 44256: unbacked, and the backed fallback)
#
# A dynamic size Dynamo may guard on ("backed") has, under
# backed_size_oblivious, a range that holds 1. So every layout question in
# traced code (reshape of a split slice, .contiguous() after a transpose, as
# GPT-2 ports, nanoGPT and gpt-fast write attention) records `size != 1`,
# which cannot be told from a real `if t == 1:`: kept as a size guard, it
# refused one-token decoding. An unbacked size admits no guard at all: each
# layout question takes the answer that holds at every size, and nothing is
# recorded. So the first trace marks the token dims unbacked. A model that
# branches on the count cannot be traced so (Dynamo raises "Could not guard
# on data-dependent expression", in a fraction of a second, as it does in
# Hugging Face's mask helpers); it is traced backed, as before, its guards
# kept as the size table of section 6, and one INFO line says where and
# which sizes they exclude. So is a model whose unbacked trace fails for any
# other reason (torch's support for unbacked sizes is young), with the error.
# =============================================================================


def unbacked_else_backed(compiled: CompiledModel, trace: Callable[[bool], Any]):
    """trace(unbacked=True), or, where that fails before the backend has
    returned, trace(unbacked=False), saying why and what it costs. The
    model's own error fails the backed trace too, and that is raised. After
    the backend returned nothing is retried: in JIT mode the model has run."""
    compiled.compiled_fn = None
    try:
        return trace(True)
    except Exception as e:
        failed_pass = cause_of(e, PassError)
        if failed_pass is not None:
            raise failed_pass  # a backed trace would run the same pass
        if compiled.compiled_fn is not None:
            raise
        decided = data_dependent_decision(e)
        why = f"the model decides {decided}" if decided else f"torch failed on it ({describe(e)})"
    compiled.cache_failed = False  # set by the failed attempt; a cache problem fails the backed one too
    result = trace(False)
    table = compiled.compiled_fn.state["size_table"]
    refused = [size for size, index in enumerate(table) if index == GUARD_FAILS]
    logger.info("vcompile: the token count cannot be traced unbacked: %s; traced backed, %s", why,
                f"its guards exclude sizes {sizes_in_words(refused)}" if refused else "every size runs")
    compiled.compiled_fn.state["backed_because"] = why
    return result


def trace_inputs(signature: inspect.Signature, args, kwargs, dims: dict[str, int],
                 config: CompilationConfig, unbacked: bool, at_size: int | None = None) -> tuple[tuple, dict]:
    """The inputs Dynamo traces: the first call's, each token dim marked
    unbacked, or for a backed trace dynamic. Marks are attributes of a
    tensor object, so each trace marks new ones: a backed retry that found
    the unbacked marks on the caller's tensors would trace unbacked again.
    One shape_id makes every token dim one symbol; two would leave
    `Eq(u1, u0)` for nothing to decide.

    vLLM traces a dummy batch of max_num_batched_tokens; vcompile traces the
    first call's inputs, and at one token a backed trace takes stride
    decisions that hold only there (a transpose of a size-1 dim is
    contiguous, so `.contiguous()` and `reshape` become views): a Hugging
    Face Llama gave NaN at 8 tokens. So a backed trace of a one-token call
    runs at two tokens, and a later trace (section 17) at `at_size`: the
    call's tensors repeated along the token dim and cut to that size.
    """
    # Each input stays where the call put it: the code Dynamo writes for a
    # forward taking (*args, **kwargs), as Hugging Face's wrappers do, reads
    # them from there, and a keyword traced as a position fails at the next call.
    if at_size is None and not unbacked and traced_at_two(signature, args, kwargs, dims, config):
        at_size = 2
    args, kwargs, names = list(args), dict(kwargs), list(signature.parameters)
    for name, dim in dims.items():
        position = names.index(name)
        value = args[position] if position < len(args) else kwargs[name]
        dim %= value.dim()
        if at_size is not None:
            times = -(-at_size // value.shape[dim])
            value = value.repeat(*[times if d == dim else 1 for d in range(value.dim())]).narrow(dim, 0, at_size).clone()
        else:
            value = value.detach()
        if position < len(args):
            args[position] = value
        else:
            kwargs[name] = value
        if unbacked:
            torch._dynamo.decorators.mark_unbacked(value, dim, shape_id="vcompile_tokens")
        else:
            torch._dynamo.mark_dynamic(value, dim)
    return tuple(args), kwargs


def traced_at_two(signature: inspect.Signature, args, kwargs, dims: dict[str, int], config: CompilationConfig) -> bool:
    """A one-token call that a backed trace runs at two tokens (above)."""
    arguments = signature.bind(*args, **kwargs).arguments
    return config.max_num_batched_tokens > 1 and any(arguments[n].shape[d] == 1 for n, d in dims.items())


def data_dependent_decision(e: Exception) -> str | None:
    """What an unbacked trace could not decide, and where, as Dynamo said it
    (`size >= 4` at `if x.size()[0] >= 4:  # model.py:12 in forward`); None
    when the trace failed for another reason, which a backed trace would not cure."""
    if cause_of(e, GuardOnDataDependentSymNode) is None:
        return None
    text = str(e)
    expr = re.search(r"data-dependent expression (.+?) \(", text)
    where = re.search(r"^Caused by: (.+?)(?: \([^()]*:\d+ in \w+\))?$", text, re.MULTILINE)
    decided = "`" + re.sub(r"\bu\d+\b", "size", expr[1]) + "`" if expr else "on a data-dependent expression"
    return decided + (f" at `{where[1].strip()}`" if where else "")


def _tracing_patches():
    # backed_size_oblivious: Dynamo would otherwise specialize a token
    # dimension of size 0 or 1 to that size, and take size 1 for special
    # wherever it decides a broadcast or a stride.
    return torch.fx.experimental._config.patch(backed_size_oblivious=True)


# =============================================================================
# 17. Sizes the first trace excludes: later traces
#
# Stock torch.compile traces again when a guard fails, in the middle of
# serving; vLLM drops the guard and runs the wrong branch. vcompile traces
# each run of excluded sizes up front, in the first call, backed at a size
# inside it, compiled for the entries that hold its sizes only. Every trace
# is saved (model, model.trace1, ...) with its table; a call goes from its
# size to its trace with one list index. A run whose trace fails as eager
# fails (torch._check) stays refused, recorded so that a warm start does not
# trace it again. JIT mode makes its later traces at every start.
# =============================================================================


def later_traces(compiled: CompiledModel, first: dict,
                 make: Callable[[int, int, list[bool]], dict | None]) -> list[dict]:
    """Traces of their own for the sizes the first trace's guards exclude,
    one run of excluded sizes at a time: make(index, size to trace at,
    sizes it serves) loads or compiles one."""
    # An unbacked trace has no guard to exclude a size with, only the
    # model's own checks (torch._check), which eager fails there too.
    if first["table"] is None or first["traced"] == "unbacked":
        return []
    compiled_fn, traces = compiled.compiled_fn, []
    # Sizes where a trace failed as eager fails, found by a cold start:
    # a warm start does not trace them again.
    given_up = set(recorded_factors(compiled.cache).get("untraceable", [])) if first["loaded"] else set()
    while True:
        tables = [first["table"], *(t["table"] for t in traces)]
        serves = [size not in given_up and all(table[size] == GUARD_FAILS for table in tables)
                  for size in range(len(first["table"]))]
        runs = runs_of([size for size, open_ in enumerate(serves) if open_])
        if not runs:
            break
        start, end = runs[0]
        guard = failed_guard(start, first["guards"])
        why = (f"size {start} fails" if start == end else f"sizes {start} to {end} fail") + f" {guard}"
        if 1 + len(traces) == compiled.config.max_traces:
            compiled.untraced = [size for size, open_ in enumerate(serves) if open_]
            logger.warning("vcompile: %s; a trace of their own would pass CompilationConfig.max_traces=%d: "
                           "sizes %s stay refused", why, compiled.config.max_traces,
                           sizes_in_words(compiled.untraced))
            break
        # One size alone is traced at that size; a wider run at a size in
        # it other than 1, where a backed trace would decide every layout
        # question for size 1 alone (see trace_inputs).
        at = start if start == end else max(start, 2)
        try:
            trace = make(1 + len(traces), at, serves)
            if trace is None:
                raise RuntimeError("its compiled function cannot be saved to load back")
        except Exception as e:  # as eager would (torch._check), or another failure: refused, not fatal
            if (compiled.cache_failed and compiled.cache is not None) or cause_of(e, PassError) is not None:
                raise  # the cache folder or a graph pass failed, not this size
            # Every size that fails the same guard is given up with this
            # run: `torch._check(x.shape[0] % 2 == 0)` would otherwise cost
            # a failed trace per odd size.
            same = [size for size, open_ in enumerate(serves) if open_ and failed_guard(size, first["guards"]) == guard]
            given_up.update(same)
            given = (f"size {same[0]}, which fails that guard, stays" if len(same) == 1 else
                     f"sizes {sizes_in_words(same)}, which fail that guard, stay")
            logger.info("vcompile: %s; a trace of their own at %d failed (%s): %s refused", why, at, describe(e),
                        given)
            continue
        traces.append(trace)
        if not trace["loaded"]:
            ran = [size for size, index in enumerate(trace["table"]) if index >= 0]
            logger.info("vcompile: %s: traced separately at %d, which runs sizes %s", why, at, sizes_in_words(ran))
    compiled.compiled_fn = compiled_fn  # the first trace's, as with one trace
    made = (traces or given_up) and not (first["loaded"] and all(t["loaded"] for t in traces))
    if made and compiled.cache is not None:
        record_factors(compiled.cache, untraceable=sorted(given_up), trace_sizes=[
            sizes_in_words([size for size, index in enumerate(t["table"]) if index >= 0]) for t in [first, *traces]])
    return traces


def dispatch(compiled: CompiledModel, traces: list[dict], dims: dict[str, int]) -> Callable:
    """The function later calls run. With one trace, its AOT function. With
    several, a table from the size to the trace that runs it: one more
    list index per call, then the trace's own (section 6)."""
    fns = [functools.partial(trace["fn"], compiled.model) for trace in traces]
    if len(fns) == 1 and not compiled.untraced:
        return fns[0]
    first = traces[0]["table"]
    # Sizes no trace runs: -1 where a guard fails (refused below), the
    # first trace where no entry holds them (it refuses them itself).
    trace_of = [next((i for i, t in enumerate(traces) if t["table"][size] >= 0),
                     0 if first[size] == OUTSIDE_EVERY_ENTRY else -1) for size in range(len(first))]
    name, dim = next(iter(dims.items()))
    position = list(compiled.__signature__.parameters).index(name)

    def run(*args, **kwargs):
        size = (args[position] if position < len(args) else kwargs[name]).shape[dim]
        trace = trace_of[size] if size < len(trace_of) else 0
        if trace < 0:
            raise refused(compiled, size, traces)
        return fns[trace](*args, **kwargs)

    return run


def refused(compiled: CompiledModel, size: int, traces: list[dict]) -> ValueError:
    served = [0 if any(t["table"][s] >= 0 for t in traces) else GUARD_FAILS for s in range(len(traces[0]["table"]))]
    error = size_refused(size, GUARD_FAILS, [], traces[0]["guards"], served)
    if size in compiled.untraced:
        error.args = (error.args[0] + f"; it has no trace of its own: a model gets at most "
                      f"CompilationConfig.max_traces={compiled.config.max_traces} traces, raise it to trace it",)
    return error


# =============================================================================
# 18. Compiling at start-up (prepare)
#
# prepare() does the first call's work before it, from example inputs, and
# runs nothing: a server's first request should not pay for the compile
# (vLLM compiles at start-up with a dummy batch; its start-up roadmap, RFC
# 34956, overlaps the compile with the weight load). Neither a trace (fake
# tensors) nor a load (weights are graph inputs) reads a weight's value, so
# prepare may run on a thread while the caller loads them. The first run,
# which loads kernels into the cache folder, waits for the first call.
# =============================================================================


def start_up(compiled: CompiledModel, args: tuple, kwargs: dict, background: bool) -> None:
    """CompiledModel.prepare: the first call's work now, or on a thread."""
    if compiled.preparing is not None or compiled.fn is not None:
        return  # one prepare at a time; what it makes serves every size
    if not background:
        with torch.no_grad():
            compiled._first(args, kwargs, run=False)
        return
    # Torch versions differ here. Without a GPU, fake tensors install a
    # no-op CUDA device guard when first used; on torch 2.11, when a thread
    # other than the caller's did that first, the caller's next trace
    # segfaulted. Installed here, on the caller's thread, it does not.
    if not torch.cuda.is_available() and hasattr(torch._C, "_ensureCUDADeviceGuardSet"):
        torch._C._ensureCUDADeviceGuardSet()

    def work():
        try:
            with torch.no_grad():
                compiled._first(args, kwargs, run=False)
        except BaseException as e:  # handed to the first call
            compiled.prepare_error = e

    compiled.preparing = threading.Thread(target=work, name="vcompile-prepare", daemon=True)
    compiled.preparing.start()


# =============================================================================
# 19. What a save cannot carry: models people bring
#
# Hugging Face decoders broke the saved artifact three ways. Their forward is
# wrapped by decorators, and pickle cannot store the original function that a
# wrapper keeps in its closure ("it's not the same object as
# ...LlamaModel.forward"). Dynamo's bytecode reads globals it installed in the
# forward's module while tracing (___module_collections_<id>, to rebuild a
# ModelOutput), and a fresh process has none of them. And torch 2.11 cannot
# wrap such a forward for saving at all ("Missing required external
# references: ['type']"). vcompile hands the first two to torch's loader
# itself. Whatever still cannot load back is found when it is saved, and that
# model runs the JIT way from then on, never compiling from scratch at every
# start.
# =============================================================================


def installed_globals(aot_fn, module_globals: set[str]) -> dict[str, Any]:
    """The globals Dynamo installed in the forward's module while tracing:
    aliases such as ___module_collections_<id> that its bytecode reads."""
    return {k: v for k, v in aot_fn.fn.__globals__.items() if k not in module_globals}


def load_aot_function(saved: dict, model: torch.nn.Module, f_globals: dict[str, Any]):
    """torch's AOT loader, given back what the save could not carry: the
    modules Dynamo's bytecode reads as installed globals, and the objects
    handed to the save as external data, rebuilt from this process's model."""
    f_globals = {**f_globals, **{name: importlib.import_module(m) for name, m in saved["modules"].items()}}
    return torch.compiler.load_compiled_function(io.BytesIO(saved["aot"]), f_globals=f_globals,
                                                 external_data=external_refs(model))


def external_refs(model: torch.nn.Module) -> dict[str, Any]:
    """What the saved function may hold that pickle cannot restore by name
    (the functions a decorated forward wraps, above; the modules, which hold
    the weights), under keys another process computes from its own model."""
    refs: dict[str, Any] = {f"module:{name}": m for name, m in model.named_modules()}
    seen: set[int] = set()
    todo = [("forward", type(model).forward)]
    while todo:
        key, fn = todo.pop()
        if not inspect.isfunction(fn) or id(fn) in seen:
            continue
        seen.add(id(fn))
        refs[key] = fn
        todo.append((f"{key}.__wrapped__", getattr(fn, "__wrapped__", None)))
        for i, cell in enumerate(fn.__closure__ or ()):
            with contextlib.suppress(ValueError):  # a cell not yet filled
                todo.append((f"{key}.<cell {i}>", cell.cell_contents))
    return refs


def check_loadable(saved: dict, model: torch.nn.Module, installed: dict[str, Any]) -> None:
    """Runs torch's loader on what is about to be saved, with the globals a
    fresh process will have, the compiled pieces left out (Inductor's own
    format): a model whose artifact cannot load back is found out now."""
    fresh_globals = {k: v for k, v in type(model).forward.__globals__.items() if k not in installed}
    without_pieces = classmethod(lambda cls, data: cls({}, None))
    with patch.object(VcompileFunction, "deserialize_compile_artifacts", without_pieces):
        load_aot_function(saved, model, fresh_globals)


def mark_aot_unavailable(cache: CacheDir | None, model: torch.nn.Module, aot_fn, reason: str) -> None:
    """The AOT artifact cannot be saved so that it loads back: left alone,
    every start would compile from scratch and fail to save again. The
    folder is marked, and the starts run the JIT way (use_aot=False), whose
    pieces load with no Inductor compile after the first."""
    if cache is None or not cache.writable:
        logger.warning("vcompile: the compiled model cannot be saved to load back: %s", reason)
        return
    marker = cache.unavailable_path
    # Edit the model's code and AOT is tried again: the sources Dynamo
    # traced, or without them the file that defines the model's class.
    try:
        model_file = inspect.getmodule(type(model))
        sources = (source_hashes(aot_fn.source_info()) if aot_fn is not None else
                   {model_file.__name__: hashlib.sha256(inspect.getsource(model_file).encode()).hexdigest()})
    except (OSError, TypeError):  # a model typed into `python -c` has no source file
        sources = {}
    try:
        write_atomically(marker, json.dumps({"reason": reason, "sources": sources}, indent=1).encode())
    except OSError as e:
        logger.warning("vcompile: the compiled model cannot be saved to load back (%s), and %s cannot be "
                       "written (%s)", reason, marker, e)
        return
    logger.warning("vcompile: warm start from an AOT artifact is unavailable for this model: %s. It runs "
                   "as with use_aot=False instead: each start traces it with Dynamo and loads its compiled "
                   "pieces from %s (delete %s to try AOT again)", reason, cache.pieces_dir, marker)


def aot_unavailable(cache: CacheDir | None) -> str | None:
    """Why this model's AOT artifact could not be saved, if an earlier
    start found out and the model's sources are the ones it saw then."""
    if cache is None:
        return None
    marker = cache.unavailable_path
    try:
        with open(marker) as f:
            record = json.load(f)
        check_sources_unchanged(record["sources"])
    except FileNotFoundError:
        return None
    except Exception:  # edited sources, or an unreadable marker: try AOT again
        with contextlib.suppress(OSError):
            os.unlink(marker)
        return None
    if os.environ.get("VCOMPILE_FORCE_AOT_LOAD") == "1":
        raise RuntimeError(f"vcompile: no AOT artifact can be loaded for this model ({record['reason']}, "
                           f"recorded in {marker}) and VCOMPILE_FORCE_AOT_LOAD=1")
    logger.info("Warm start from the AOT artifact is unavailable for this model (%s); Dynamo traces it "
                "and its compiled pieces load from %s", record["reason"], cache.pieces_dir)
    return record["reason"]


# =============================================================================
# 20. The cache from the command line: list, remove, prune
#
#   python -m vcompile cache [ROOT] [--json]      what each hash folder holds
#   python -m vcompile cache ROOT --remove HASH   delete one folder
#   python -m vcompile cache ROOT --prune [--older-than DAYS] [--max-size SIZE] [--dry-run]
#
# A cache nobody can see into gets deleted whole the first time something
# looks wrong, and every warm start with it; and it only grows: every torch
# upgrade, config change or model edit leaves a hash folder behind. Each
# folder's factors file says what it is for, its last_loaded file when a
# start last used it. Pruning removes whole folders, least recently loaded
# first, each renamed away first: a start finds all of one or none.
# =============================================================================


def cache_listing(root: str) -> list[dict]:
    parent = os.path.join(root, "torch_aot_compile")
    rows = []
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        folder = os.path.join(parent, name)
        if not re.fullmatch(r"[0-9a-f]{16}", name) or not os.path.isdir(folder):  # or one being removed
            continue
        factors: dict = {}
        with contextlib.suppress(OSError, ValueError):  # a folder from an older vcompile has none
            with open(os.path.join(folder, FACTORS_FILE)) as f:
                factors = json.load(f)
        files = []
        for parent_dir, _, names in os.walk(folder):
            for file in names:
                with contextlib.suppress(OSError):  # removed while we look
                    files.append((file, os.lstat(os.path.join(parent_dir, file))))
        loaded = next((stat.st_mtime for file, stat in files if file == LAST_LOADED_FILE), None)
        rank_dirs = [d for d in os.listdir(folder) if d.startswith("rank_")]
        rows.append({
            "hash": name,
            "path": folder,
            "model": factors.get("model"),
            "vcompile": factors.get("vcompile_version"),  # None: written before 0.2.0
            "traced": factors.get("traced"),  # "unbacked" or "backed" (section 16); None: not yet, or before 0.2.0
            "backed_because": factors.get("backed_because"),  # why not unbacked, where it was tried
            "trace_sizes": factors.get("trace_sizes"),  # the sizes each trace runs, where there are several
            "passes": factors.get("passes") or [],  # graph passes (section 7): name, where it applies, uuid
            "torch": (factors.get("torch") or [None])[0],
            "device": factors.get("device"),
            "compile_entries": factors.get("compile_entries"),
            "artifacts": sorted(os.path.join(d, file) for d in rank_dirs for file in os.listdir(os.path.join(folder, d))
                                if re.fullmatch(r"model(\.trace\d+)?", file)),
            "bytes": sum(stat.st_size for _, stat in files),
            "last_loaded": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(loaded)) if loaded else None,
            # What pruning goes by: the last load, else when the folder was last written.
            "last_used": loaded or max((stat.st_mtime for _, stat in files), default=os.path.getmtime(folder)),
        })
    return rows


def remove_hash_folder(folder: str) -> None:
    doomed = os.path.join(os.path.dirname(folder), f".removing-{os.path.basename(folder)}-{uuid.uuid4().hex[:8]}")
    os.rename(folder, doomed)  # atomic: a start sees the whole folder or none
    shutil.rmtree(doomed, ignore_errors=True)


def prune_cache(root: str, older_than_days: float | None = None, max_bytes: int | None = None,
                dry_run: bool = False) -> list[dict]:
    """Removes whole hash folders under `root`, least recently used first:
    every folder not loaded (or, never loaded, not written) for
    `older_than_days`, then as many more as it takes to bring the root down
    to `max_bytes`. Returns the listing rows of the folders it removed, or
    with dry_run would remove."""
    rows = sorted(cache_listing(root), key=lambda row: row["last_used"])
    cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else None
    remaining = sum(row["bytes"] for row in rows)
    doomed = []
    for row in rows:
        if (cutoff is not None and row["last_used"] < cutoff) or (max_bytes is not None and remaining > max_bytes):
            doomed.append(row)
            remaining -= row["bytes"]
    for row in doomed if not dry_run else []:
        remove_hash_folder(row["path"])
    return doomed


def parse_size(text: str) -> int:
    """'20G' -> 20 * 2**30; K, M, G, T are powers of 1024, a plain number is bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500M, 20G)")
    return int(float(match[1]) * 1024 ** "BKMGT".index(match[2].upper() or "B"))


def main(argv: list[str] | None = None) -> None:
    # A vendored copy runs as `python -m myproj._vendor.vcompile`: say so in its usage.
    module = __spec__.name if __spec__ is not None else "vcompile"
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=f"vcompile {__version__}'s compile cache.")
    commands = parser.add_subparsers(dest="command", required=True)
    cache = commands.add_parser("cache", help="list the compiled models under a cache root, remove or prune them")
    cache.add_argument("root", nargs="?", help="the cache root (default: $VCOMPILE_CACHE_ROOT, else ~/.cache/vcompile)")
    cache.add_argument("--json", action="store_true", help="print the listing as JSON, for scripts")
    cache.add_argument("--remove", metavar="HASH", help="delete the hash folder HASH under the root")
    cache.add_argument("--prune", action="store_true", help="remove hash folders, least recently loaded first")
    cache.add_argument("--older-than", metavar="DAYS", type=float, help="with --prune: those unused for DAYS")
    cache.add_argument("--max-size", metavar="SIZE", type=parse_size,
                       help="with --prune: until the root holds at most SIZE (500M, 20G)")
    cache.add_argument("--dry-run", action="store_true", help="with --prune: list what would go, remove nothing")
    args = parser.parse_args(argv)
    root = args.root or cache_root(CompilationConfig())
    if (args.older_than is not None or args.max_size is not None or args.dry_run) and not args.prune:
        parser.error("--older-than, --max-size and --dry-run go with --prune")
    if args.prune:
        if args.older_than is None and args.max_size is None:
            parser.error("--prune needs --older-than DAYS, --max-size SIZE, or both")
        print_pruned(root, prune_cache(root, args.older_than, args.max_size, args.dry_run), args.dry_run)
    elif args.remove is not None:
        folder = os.path.join(root, "torch_aot_compile", args.remove)
        if not re.fullmatch(r"[0-9a-f]{16}", args.remove) or not os.path.isdir(folder):
            parser.error(f"no hash folder {args.remove!r} under {root}")
        remove_hash_folder(folder)
        print(f"removed {folder}")
    elif args.json:
        print(json.dumps(cache_listing(root), indent=1))
    else:
        print_listing(root, cache_listing(root))


def print_listing(root: str, rows: list[dict]) -> None:
    if not rows:
        print(f"no compiled models under {root}")
        return
    print(f"{len(rows)} compiled model(s) under {root}")
    for row in rows:
        print(f"\n{row['hash']}  {row['model'] or '(no factors file)'}  {row['bytes'] / 2**20:.1f} MB  "
              f"last loaded {row['last_loaded'] or 'never'}")
        if row["model"] is not None:
            print(f"    written by vcompile {row['vcompile'] or 'older than 0.2.0'}, torch {row['torch']}, {row['device']}")
            print(f"    compile entries: {', '.join(row['compile_entries'])}")
            if row["traced"] is not None:
                print("    traced: " + {"unbacked": "unbacked, no guard on the token count",
                                        "backed": "backed, its guards on the token count kept"}[row["traced"]]
                      + (f" (not unbacked: {row['backed_because']})" if row["backed_because"] else ""))
            if row["passes"]:
                print("    graph passes: " + "; ".join(p.rsplit(" ", 1)[0] for p in row["passes"]))
            for i, sizes in enumerate(row["trace_sizes"] or []):
                print(f"    trace {i + 1} runs sizes {sizes}")
        print(f"    warm start from: {', '.join(row['artifacts']) or 'no AOT artifact'}")


def print_pruned(root: str, rows: list[dict], dry_run: bool) -> None:
    verb = "would remove" if dry_run else "removed"
    for row in rows:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["last_used"]))
        print(f"{verb} {row['hash']}  {row['model'] or '(no factors file)'}  {row['bytes'] / 2**20:.1f} MB  "
              f"last used {used}")
    left = sum(row["bytes"] for row in cache_listing(root)) - (sum(row["bytes"] for row in rows) if dry_run else 0)
    print(f"{verb} {len(rows)} folder(s), {sum(row['bytes'] for row in rows) / 2**20:.1f} MB; "
          f"{left / 2**20:.1f} MB {'would remain' if dry_run else 'remain'} under {root}")


if __name__ == "__main__":
    main()
