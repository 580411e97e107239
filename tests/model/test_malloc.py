"""glibc malloc tuning (model.malloc): large tensors come from the heap on every thread, not from
fresh mappings, whether the tuning arrives by ``tune_malloc`` or by the environment it exports."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from model.malloc import MALLOC_ENVIRONMENT

REPO = Path(__file__).resolve().parents[2]
MAPPED_BYTES = """
import ctypes, json, sys, threading
if sys.argv[1] == "tune":
    from model.malloc import tune_malloc
    assert tune_malloc()
import torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
mapped = {}

def allocate(name):
    before = libc.mallinfo2().hblkhd  # bytes in blocks that have a mapping of their own
    tensor = torch.ones(32 * 2**20)  # 128 MiB, twice a thread arena's largest heap
    mapped[name] = libc.mallinfo2().hblkhd - before
    del tensor

allocate("main")
worker = threading.Thread(target=allocate, args=("worker",))
worker.start()
worker.join()
print(json.dumps(mapped))
"""


def mapped_bytes(mode: str, extra_env: dict[str, str]) -> dict[str, int]:
    """Bytes held in separately mapped blocks while a 128 MiB tensor is alive, per thread."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    env.update(extra_env)
    command = [sys.executable, "-c", MAPPED_BYTES, mode]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
@pytest.mark.parametrize(
    ("mode", "extra_env"),
    [("tune", {}), ("environment", MALLOC_ENVIRONMENT)],
    ids=["tune_malloc", "environment"],
)
def test_large_tensors_come_from_the_heap_on_every_thread(mode: str, extra_env: dict[str, str]) -> None:
    assert mapped_bytes(mode, extra_env) == {"main": 0, "worker": 0}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_without_the_tuning_large_tensors_are_mapped_afresh() -> None:
    """The control: glibc's defaults map a 128 MiB tensor of its own on both threads."""
    assert all(size >= 128 * 2**20 for size in mapped_bytes("untuned", {}).values())


def test_tune_malloc_exports_the_environment_for_child_processes() -> None:
    """The test process runs under the Makefile's environment or has called tune_malloc (service.cli)."""
    import service.cli  # noqa: F401  (tunes malloc on import)

    assert {name: os.environ[name] for name in MALLOC_ENVIRONMENT} == MALLOC_ENVIRONMENT


def test_the_makefile_exports_the_same_environment() -> None:
    makefile = (REPO / "Makefile").read_text()
    exported = dict(re.findall(r"^export (MALLOC_\w+) := (\S+)$", makefile, re.MULTILINE))
    assert exported == MALLOC_ENVIRONMENT
