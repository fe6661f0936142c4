"""The real SmolLM2-135M-Instruct weights (dequantized from the shipped GGUF): a 4-layer truncated copy through the
MindSpore source model, its MLA conversion and generation, against transformers on the same directory."""
import numpy as np
import pytest
import torch

import mindspore as ms
from youzhi_ms.runtime import init_context

init_context("graph")

from transformers import AutoModelForCausalLM  # noqa: E402

from youzhi_ms.checkpoint.hf import HFCheckpoint, copy_side_files, save_safetensors, write_json  # noqa: E402
from youzhi_ms.checkpoint.mindspore_ckpt import load_model  # noqa: E402

N_LAYERS = 4


@pytest.fixture(scope="module")
def smollm2_4l(smollm2_hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2_4l")
    ck = HFCheckpoint(smollm2_hf_dir)
    cfg = dict(ck.config)
    cfg["num_hidden_layers"] = N_LAYERS
    keep = [n for n in ck.names() if not n.startswith("model.layers.") or int(n.split(".")[2]) < N_LAYERS]
    save_safetensors(str(out / "model.safetensors"), [(n, ck.get(n)) for n in keep])
    write_json(str(out / "config.json"), cfg)
    copy_side_files(smollm2_hf_dir, str(out))
    return str(out)


def test_truncated_smollm2_logits_match_transformers(smollm2_4l):
    from youzhi_ms.data.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(smollm2_4l)
    ids = np.array([[0] + tok.encode("The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It is named "
                                     "after the engineer Gustave Eiffel, whose company designed and built it.")])
    ref_model = AutoModelForCausalLM.from_pretrained(smollm2_4l, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.numpy()
    model, cfg = load_model(smollm2_4l)
    assert cfg.num_layers == N_LAYERS and cfg.num_kv_heads == 3 and cfg.num_heads == 9
    out = model(ms.Tensor(ids, ms.int32)).asnumpy()
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-4
