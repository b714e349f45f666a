"""`tpserve convert`: both command forms, the flags reaching the converters, errors as exit code 1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ckpt_helpers import save_hf_folder
from helpers import random_hf_model
from safetensors.torch import load_file

from tpserve.model.checkpoint import read_checkpoint_info
from tpserve.server.cli import main

LEGACY = Path(__file__).parent.parent / "fixtures" / "megatron_legacy" / "gpt2_tp2"


def test_hf_to_tpserve_and_back(tmp_path, capsys):
    hf = random_hf_model("qwen2_qkv_bias")
    save_hf_folder(hf, tmp_path / "hf")
    main(["convert", "--from", "hf", str(tmp_path / "hf"), str(tmp_path / "tp"), "--dtype", "bfloat16",
          "--max-shard-size", "40KB"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "tp")
    assert read_checkpoint_info(tmp_path / "tp").dtype == torch.bfloat16
    assert len(list((tmp_path / "tp").glob("model-*.safetensors"))) > 1
    main(["convert", "export-hf", str(tmp_path / "tp"), str(tmp_path / "back"), "--dtype", "float32"])
    back = load_file(tmp_path / "back" / "model.safetensors")
    for name, tensor in hf.state_dict().items():
        assert torch.equal(back[name], tensor.bfloat16().float()), name


def test_megatron_with_allow_pickle_and_vocab_size(tmp_path):
    main(["convert", "--from", "megatron", str(LEGACY), str(tmp_path / "tp"), "--allow-pickle", "--vocab-size", "250"])
    assert read_checkpoint_info(tmp_path / "tp").config.vocab_size == 250


@pytest.mark.parametrize(
    "argv, message",
    [
        (["convert", "a", "b"], "say what SRC is with --from"),
        (["convert", "--from", "hf", "a"], "expected SRC and DST"),
        (["convert", "--from", "hf", "a", "b", "--vocab-size", "3"], "--vocab-size applies to --from megatron only"),
    ],
)
def test_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_conversion_errors_exit_1_with_the_reason(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", "--from", "megatron", str(LEGACY), str(tmp_path / "tp")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "model_optim_rng.pt is a pickle file" in err and "--allow-pickle" in err
    assert not (tmp_path / "tp").exists()


def test_help_explains_pickle(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # undo argparse line wrapping
    assert "export-hf" in out and "runs whatever code the file contains" in out
