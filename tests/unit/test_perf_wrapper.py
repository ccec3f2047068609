"""`stac perf install` leaves a perf_analyzer that runs as typed: a wrapper sets LD_LIBRARY_PATH."""

from __future__ import annotations

import os
import subprocess

from stac_backend.loadgen.perf import write_wrapper


def test_wrapper_puts_the_unpacked_libraries_on_the_loader_path(tmp_path):
    dest = tmp_path / "perf_analyzer"
    (dest / "bin").mkdir(parents=True)
    (dest / "lib").mkdir()
    fake = dest / "bin" / "perf_analyzer"  # stands in for the real binary: prints what it was given
    fake.write_text('#!/bin/sh\necho "LD=$LD_LIBRARY_PATH ARGS=$*"\n')
    fake.chmod(0o755)
    on_path = tmp_path / "venv-bin"
    on_path.mkdir()
    wrapper = write_wrapper(dest, bin_dir=on_path)
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    for command in (str(wrapper), str(on_path / "perf_analyzer")):  # directly and through the PATH link
        out = subprocess.run([command, "-m", "stac", "--streaming"], capture_output=True, text=True, env=env,
                             timeout=30).stdout.strip()
        assert out == f"LD={dest.resolve() / 'lib'} ARGS=-m stac --streaming"
    env["LD_LIBRARY_PATH"] = "/opt/other"
    out = subprocess.run([str(wrapper)], capture_output=True, text=True, env=env, timeout=30).stdout.strip()
    assert out.startswith(f"LD={dest.resolve() / 'lib'}:/opt/other")
