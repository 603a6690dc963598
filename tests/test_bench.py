"""Every benchmark script runs: a smoke run of each in its quick mode, so that a script that no longer imports or
crashes (a renamed key, a changed function, a module of bench/ shadowing a library) fails `make test`. Nothing
here asserts on speed (STYLE.md 17); the numbers of a quick run prove nothing."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from queue import Queue

from tests.conftest import PYTHON, ROOT, subprocess_env
from tests.preloaded import PreloadedServer, preload_enabled

BENCH = ROOT / "bench"

# Each script's smoke run: its quick mode (tiny sizes), its outputs under the test's directory where it takes
# one, and, where a script runs many variants of one code path, the fewest that still take every path (each
# variant is a process paying ~7 s of imports). {tmp} is the test's directory.
SMOKE_ARGS = {
    "adapter_savings.py": ["--quick", "--variants", "full", "qlora", "--threads", "1", "--out-dir", "{tmp}"],
    "data.py": ["--quick", "--work", "{tmp}/work", "--out", "{tmp}/data.json"],
    "distill.py": ["--quick", "--out", "{tmp}"],
    "memory.py": ["--quick", "--run-dir", "{tmp}/run", "--out", "{tmp}/memory.json"],
    "mfu.py": ["--quick", "--variants", "fsdp:bf16:profile", "--out", "{tmp}/mfu.json"],
    "plan.py": ["--quick"],
    "precision.py": ["--quick", "--precisions", "fp32", "bf16", "--out", "{tmp}/precision.json"],
    "prune.py": ["--quick", "--out", "{tmp}/prune.json"],
    "quantize.py": ["--quick", "--schemes", "int8_weight", "--work", "{tmp}", "--threads", "1"],
    "sft.py": ["--quick", "--repeats", "1", "--out", "{tmp}/sft.json"],
    "sft_learns.py": ["reverse", "--quick", "--work", "{tmp}"],
    "throughput.py": ["--quick"],
}


def bench_scripts() -> list[str]:
    return sorted(p.name for p in BENCH.glob("*.py"))


def test_no_bench_script_is_named_like_a_module_it_would_shadow():
    """`python bench/X.py` puts bench/ first on the path: a script named like an installed package or a standard
    module is what `import NAME` finds in every bench process (bench/peft.py broke transformers' Trainer)."""
    assert str(BENCH) not in sys.path
    for name in bench_scripts():
        module = name.removesuffix(".py")
        assert module not in sys.stdlib_module_names, f"bench/{name} shadows the standard module {module}"
        spec = importlib.util.find_spec(module)
        assert spec is None, f"bench/{name} shadows {spec.origin}: rename the script"


def test_every_bench_script_runs_its_quick_mode(tmp_path):
    """Each script runs as `python bench/X.py ARGS` forked from a server that has the trainer's imports done
    (tests/preloaded.py), its folder first on the path as python puts it; what it starts itself starts afresh."""
    assert sorted(SMOKE_ARGS) == bench_scripts(), "give every bench script its smoke run in SMOKE_ARGS"

    def smoke(
        name: str, server: PreloadedServer | None
    ) -> tuple[str, subprocess.CompletedProcess | None, float]:
        out = tmp_path / name.removesuffix(".py")
        out.mkdir()
        args = [a.replace("{tmp}", str(out)) for a in SMOKE_ARGS[name]]
        start = time.perf_counter()
        try:
            if server is None:
                proc = subprocess.run(
                    [PYTHON, str(BENCH / name), *args],
                    cwd=ROOT,
                    env=subprocess_env(),
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                proc.stdout += proc.stderr
            else:
                log = out / "smoke.log"
                proc = server.run(
                    args,
                    script=str(BENCH / name),
                    nproc=1,
                    port=0,
                    log=log,
                    env=subprocess_env(),
                    timeout=600,
                )
        except subprocess.TimeoutExpired:
            proc = None
        return name, proc, time.perf_counter() - start

    # Two at a time: a smoke run is mostly one thread importing, and `make test` has two cores. One server
    # per worker thread (a server runs one job at a time): two imports instead of one per script.
    servers = (
        [PreloadedServer(root=ROOT, env=subprocess_env()) for _ in range(2)] if preload_enabled() else []
    )
    queue = Queue()
    for server in servers or [None, None]:
        queue.put(server)

    def smoke_on_a_free_server(name: str) -> tuple[str, subprocess.CompletedProcess | None, float]:
        server = queue.get()
        try:
            return smoke(name, server)
        finally:
            queue.put(server)

    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = list(pool.map(smoke_on_a_free_server, bench_scripts()))
    finally:
        for server in servers:
            server.close()
    failed = [
        f"bench/{name} "
        + ("ran past 600 s" if proc is None else f"exited {proc.returncode}:\n")
        + ("" if proc is None else proc.stdout[-3000:])
        for name, proc, _ in results
        if proc is None or proc.returncode != 0
    ]
    print("\n".join(f"bench/{name}: {seconds:.0f} s" for name, _, seconds in results))
    assert not failed, "\n\n".join(failed)
