"""Test-session setup.

Triton reads TRITON_INTERPRET when it decorates kernels, so it is set here, before any test module
imports triton (directly, or through bitsandbytes or transformers): the kernels then run on CPU
tensors in Triton's interpreter. backend="auto" still picks the torch path on CPU.

The models here are tiny, so one intra-op thread is as fast as several and keeps the suite's
time steady on a busy machine (subprocesses started by tests inherit it).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from helpers import make_adapters, tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory):
    """``adapter_dirs(arch)``: the three PEFT adapters of helpers.make_adapters for the arch's tiny
    model, written once per test session."""
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = make_adapters(tiny_model(arch), arch, tmp_path_factory.mktemp(arch))
        return cache[arch]

    return get
