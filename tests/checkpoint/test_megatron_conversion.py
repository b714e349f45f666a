"""Megatron checkpoints -> tpserve: Megatron-Core torch_dist, and legacy Megatron-LM mp_rank_XX.

torch_dist: checkpoints written by megatron-core 0.19.2 itself at TP 1 and 2, and at PP 2 (with TP 1
and an uneven 1 + 2 layer split, and with TP 2 and tied embeddings), and a mixture of experts (4
experts, top 2, a gated shared expert) at TP 1 and 2, with a dense first layer, and with sigmoid
router scores with and without an expert bias (megatron-core is the only reference for those)
(tests/fixtures/make_megatron_goldens.py); the converted checkpoint must give the logits
megatron-core computed through its pipeline, with the args read from the checkpoint (pickle,
allowed) or from JSON.

Legacy: checkpoints in the GPT2-345M layout (tests/fixtures/make_legacy_megatron_fixture.py) at TP 2,
and at TP 2 x PP 3 with an uneven first and last stage, must convert to the same tensors as Hugging
Face transformers' own convert_megatron_gpt2_checkpoint.py gives on the same weights merged to TP 1
and PP 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from ckpt_helpers import logits_of
from safetensors.torch import load_file

from tpserve.model.checkpoint import CheckpointError, load_model, read_checkpoint_info
from tpserve.model.checkpoint.convert_megatron import convert_megatron
from tpserve.model.checkpoint.export_hf import export_hf

FIXTURES = Path(__file__).parent.parent / "fixtures"
TORCH_DIST = FIXTURES / "megatron" / "torch_dist"
LEGACY = FIXTURES / "megatron_legacy" / "gpt2_tp2"
# fixture name -> its number of layers
LEGACY_FIXTURES = {"gpt2_tp2": 2, "gpt2_tp2_pp3": 4}


@pytest.mark.parametrize(
    "name", ["llama_like_tp1", "llama_like_tp2", "gpt2_like_tp2", "llama_like_tp1_pp2", "gpt2_like_tp2_pp2",
             "moe_like_tp1", "moe_like_tp2", "moe_like_mixed_tp1", "moe_sigmoid_tp1", "moe_sigmoid_bias_tp1"]
)
@pytest.mark.parametrize("args_from", ["checkpoint", "json"])
def test_torch_dist_gives_megatron_core_logits(name, args_from, tmp_path):
    fixture = TORCH_DIST / name
    if args_from == "checkpoint":
        path = convert_megatron(fixture / "ckpt", tmp_path / "tp", allow_pickle=True)
    else:
        path = convert_megatron(fixture / "ckpt", tmp_path / "tp", megatron_args=fixture / "megatron_args.json")
    golden = np.load(fixture / "golden.npz")
    model = load_model(path, dtype=torch.float32, progress=False)
    with torch.no_grad():
        logits = model(torch.from_numpy(golden["input_ids"]), torch.from_numpy(golden["position_ids"]))
    torch.testing.assert_close(logits, torch.from_numpy(golden["logits"]), atol=1e-4, rtol=1e-4)


def test_torch_dist_args_need_pickle_or_json(tmp_path):
    with pytest.raises(CheckpointError, match=r"pickled common state; .*--allow-pickle.*--megatron-args FILE"):
        convert_megatron(TORCH_DIST / "llama_like_tp2" / "ckpt", tmp_path / "tp")
    assert list(tmp_path.iterdir()) == []


def test_torch_dist_missing_distcp_file(tmp_path):
    import shutil

    broken = tmp_path / "ckpt"
    shutil.copytree(TORCH_DIST / "llama_like_tp2" / "ckpt", broken)
    (broken / "__1_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp is missing: it holds \(part of\) tensor '[\w.]+'"):
        convert_megatron(broken, tmp_path / "tp", megatron_args=TORCH_DIST / "llama_like_tp2" / "megatron_args.json")
    assert not (tmp_path / "tp").exists()


def test_torch_dist_truncated_distcp_file(tmp_path):
    import shutil

    broken = tmp_path / "ckpt"
    shutil.copytree(TORCH_DIST / "llama_like_tp1" / "ckpt", broken)
    data = (broken / "__0_0.distcp").read_bytes()
    (broken / "__0_0.distcp").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: file is truncated: tensor '[\w.]+' needs bytes up to"):
        convert_megatron(broken, tmp_path / "tp", megatron_args=TORCH_DIST / "llama_like_tp1" / "megatron_args.json")


def test_torch_dist_wrong_args_shape_is_named(tmp_path):
    import json

    args = json.loads((TORCH_DIST / "llama_like_tp1" / "megatron_args.json").read_text())
    (tmp_path / "args.json").write_text(json.dumps(args | {"ffn_hidden_size": 128}))
    with pytest.raises(CheckpointError, match=r"decoder\.layers\.0\.mlp\.linear_fc1\.weight: stored shape \[320, 64\], the model needs \[256, 64\]"):
        convert_megatron(TORCH_DIST / "llama_like_tp1" / "ckpt", tmp_path / "tp", megatron_args=tmp_path / "args.json")


@pytest.mark.parametrize("name", LEGACY_FIXTURES)
def test_legacy_matches_transformers_converter(name, tmp_path):
    legacy = FIXTURES / "megatron_legacy" / name
    path = convert_megatron(legacy, tmp_path / "tp", allow_pickle=True)
    assert read_checkpoint_info(path).dtype == torch.float16  # kept as stored
    export_hf(path, tmp_path / "hf")
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    reference = np.load(legacy / "transformers_reference.npz")
    # transformers writes lm_head.weight (a copy of wte); a tied HF folder leaves it out.
    assert sorted(exported) == sorted(k for k in reference.files if k != "lm_head.weight")
    for name in exported:
        assert torch.equal(exported[name], torch.from_numpy(reference[name])), name


@pytest.mark.parametrize("name", LEGACY_FIXTURES)
def test_legacy_logits_equal_hf_gpt2_on_transformers_weights(name, tmp_path):
    legacy = FIXTURES / "megatron_legacy" / name
    path = convert_megatron(legacy, tmp_path / "tp", allow_pickle=True, vocab_size=250)
    reference = np.load(legacy / "transformers_reference.npz")
    config = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=LEGACY_FIXTURES[name], n_head=4, n_inner=128,
                                     activation_function="gelu_fast")
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.load_state_dict({k: torch.from_numpy(reference[k]).float() for k in reference.files}, strict=False)
    tokens = [[3, 17, 200, 249, 5, 5, 80, 1], [0, 1, 2, 3, 4, 5, 6, 7]]
    with torch.no_grad():
        expected = hf(torch.tensor(tokens)).logits[..., :250]
    torch.testing.assert_close(logits_of(load_model(path, dtype=torch.float32, progress=False), tokens), expected, atol=1e-4, rtol=1e-4)


def _copy_legacy(name: str, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(FIXTURES / "megatron_legacy" / name, tmp_path / name)
    return tmp_path / name / "iter_0000010"


def test_legacy_stage_missing_is_named(tmp_path):
    import shutil

    iteration = _copy_legacy("gpt2_tp2_pp3", tmp_path)
    shutil.rmtree(iteration / "mp_rank_01_001")
    with pytest.raises(CheckpointError, match=r"mp_rank_01_001 missing"):
        convert_megatron(iteration, tmp_path / "tp", allow_pickle=True)


def test_legacy_stage_layer_counts_must_match_args(tmp_path):
    """Stages that do not hold the layers their args' split gives: here the args are edited to
    claim a first stage of 2 layers (2, 1, 1), while the stages hold 1, 2, 1."""
    iteration = _copy_legacy("gpt2_tp2_pp3", tmp_path)
    for rank in range(2):
        for stage in range(3):
            file = iteration / f"mp_rank_{rank:02d}_{stage:03d}" / "model_optim_rng.pt"
            state = torch.load(file, weights_only=False)
            state["args"].decoder_first_pipeline_num_layers = 2
            state["args"].decoder_last_pipeline_num_layers = None
            torch.save(state, file)
    with pytest.raises(CheckpointError, match=r"the stages hold \[1, 2, 1\] layers but num_layers=4 splits into \[2, 1, 1\]"):
        convert_megatron(iteration, tmp_path / "tp", allow_pickle=True)


def test_legacy_needs_allow_pickle(tmp_path):
    with pytest.raises(CheckpointError, match=r"model_optim_rng\.pt is a pickle file; reading it runs arbitrary code.*--allow-pickle"):
        convert_megatron(LEGACY, tmp_path / "tp")
    assert list(tmp_path.iterdir()) == []


def test_not_a_megatron_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="neither a torch_dist checkpoint .* nor a legacy one"):
        convert_megatron(tmp_path, tmp_path / "tp")


def test_the_expert_bias_changes_megatron_cores_choices():
    """The two sigmoid-router fixtures share every weight (same seeds) but the expert bias: its
    golden logits differ, so converting the bias right is what makes them match."""
    plain, biased = (np.load(TORCH_DIST / name / "golden.npz")["logits"] for name in ("moe_sigmoid_tp1", "moe_sigmoid_bias_tp1"))
    assert np.abs(plain - biased).max() > 0.1
