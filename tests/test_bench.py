"""The bench: its fast paths are correct (batched KV-cached greedy decoding == per-example `model.generate`), its
measurements are real (metrics land in a real SQLite store, the RSS of a real child process), and its table and
PASS/FAIL logic say what was measured. Real tiny models, real stores, real subprocesses; no mocks."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

import pytest
import torch

from latentgate.bench import generation, gpu, processes, report, step, timing, tracking_cost
from latentgate.config import flatten, resolve
from latentgate.eval.generate import greedy_generate

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def tiny_llama(seed: int = 0, vocab: int = 48):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def pick_eos(rows: list[list[int]]) -> int:
    """A token that some (not all) greedy rows emit: used as EOS, so early stopping is really exercised."""
    n = len(rows)
    counts = Counter(t for r in rows for t in set(r))
    for tok, c in counts.most_common():
        if 0 < c < n:
            return tok
    raise AssertionError("no token splits the rows")


# ---- correctness of the fast path ----------------------------------------------------------------------------

def test_batched_greedy_equals_per_example_generate_on_latent_prefixes():
    lm = tiny_llama()
    b, p, h, t = 24, 7, 32, 8
    emb = torch.randn(b, p, h, generator=torch.Generator().manual_seed(1)) * 0.5
    mask = torch.ones(b, p, dtype=torch.long)
    first = greedy_generate(lm, emb, mask, t, stop_ids=-1).token_ids  # no EOS: every row runs to the cap
    assert all(len(r) == t for r in first)
    eos = pick_eos(first)
    batched = greedy_generate(lm, emb, mask, t, eos)
    reference = generation.per_example_generate(lm, emb, mask, t, eos, pad_id=0)
    assert batched.token_ids == reference
    lengths = {len(r) for r in batched.token_ids}
    assert min(lengths) < t and max(lengths) == t  # some rows stopped at EOS, some ran to the cap
    assert all(eos not in r for r in batched.token_ids)
    # first-token logits are those of the full (uncached) forward pass at the last prefix position
    full = lm(inputs_embeds=emb, attention_mask=mask).logits[:, -1]
    torch.testing.assert_close(batched.first_logits, full, rtol=1e-4, atol=1e-5)


def test_batched_greedy_equals_generate_on_left_padded_prompts():
    """Text prompts of different lengths are left-padded in a batch; each must decode as if it were alone."""
    lm = tiny_llama(seed=3)
    g = torch.Generator().manual_seed(4)
    lengths = [3, 9, 5, 9, 1, 6, 8, 2]
    s, t = max(lengths), 6
    ids = torch.zeros(len(lengths), s, dtype=torch.long)
    mask = torch.zeros(len(lengths), s, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, s - n :] = torch.randint(3, 48, (n,), generator=g)
        mask[i, s - n :] = 1
    emb = lm.get_input_embeddings()(ids).detach()
    eos = pick_eos(greedy_generate(lm, emb, mask, t, stop_ids=-1).token_ids)
    batched = greedy_generate(lm, emb, mask, t, eos).token_ids
    alone = [generation.per_example_generate(lm, emb[i : i + 1, s - n :], mask[i : i + 1, s - n :], t, eos, 0)[0]
             for i, n in enumerate(lengths)]
    assert batched == alone


# ---- table, verdicts, outputs --------------------------------------------------------------------------------

def test_verdicts_follow_the_targets():
    assert report.judge(0.98, ">=", 0.97) == report.PASS
    assert report.judge(0.96, ">=", 0.97) == report.FAIL
    assert report.judge(0.5, "<=", 0.5) == report.PASS
    assert report.judge(0.51, "<=", 0.5) == report.FAIL
    assert report.judge(0.0, ">", 0.0) == report.FAIL
    assert report.judge(None, ">=", 1) == report.NOT_MEASURED
    row = report.ratio_row("k", "what", "base", 9.9, ">=", 10, "9.9x")
    assert (row.status, row.target) == (report.FAIL, ">= 10x")
    assert report.overall([report.ratio_row("a", "w", "c", 11, ">=", 10, "11x"),
                           report.not_measured("g", "gpu", "-", "MFU >= 40%", "no GPU")])
    assert not report.overall([row])
    assert not report.overall([report.error_row("e", "w", "c", "t", RuntimeError("boom\nmore"))])


def test_interleave_alternates_and_limits_reps():
    calls = []
    times = report.interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 4, counts={"b": 2})
    assert calls == ["a", "b", "b", "a", "a", "a"]  # A B, B A, A, A  (b limited to 2 runs)
    assert len(times["a"]) == 4 and len(times["b"]) == 2
    assert report.paired_ratio([1.0, 2.0, 3.0], [2.0, 2.0, 3.0]) == 1.0
    reps = [[(1.0, 0.5), (3.0, 1.0)], [(2.0, 0.4), (2.0, 2.0)]]
    assert timing.best_of(reps) == (3.0, 1.4)  # per segment the fastest repetition, summed
    assert timing.best_of(reps, slice(1, None)) == (2.0, 1.0)


def test_table_markdown_and_json(tmp_path):
    rows = [report.ratio_row("tracking", "training step with tracking " * 3, "NullTracker", 0.99, ">=", 0.97,
                             "0.990x (long measured text " + "x" * 80 + ")", details={"steps": 5}),
            report.ratio_row("startup", "start-up", "python -c pass", 0.7, "<=", 0.5, "0.70 s", unit=" s"),
            report.not_measured("gpu_step", "GPU | step", "-", "MFU >= 40%", "no GPU")]
    table = report.format_table(rows)
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["what", "compared"] and set(lines[1]) <= {"-", " "}
    assert "PASS" in table and "FAIL" in table and "not measured (no GPU)" in table
    assert max(len(x) for x in lines) < 200  # long cells wrap instead of running off
    env = {"date": "2026-01-01", "cpus": 2, "torch": "x", "torch_threads": 1}
    js, md = report.write_outputs(rows, tmp_path / "out", env)
    data = json.loads(js.read_text())
    assert [r["status"] for r in data["rows"]] == [report.PASS, report.FAIL, report.NOT_MEASURED]
    assert data["rows"][0]["details"] == {"steps": 5} and data["environment"]["date"] == "2026-01-01"
    md_lines = md.read_text().splitlines()
    assert md_lines[2].startswith("| what |") and len([x for x in md_lines if x.startswith("| ")]) == 4
    assert "GPU \\| step" in md.read_text()  # a pipe in a cell cannot break the markdown table


# ---- real measurements on tiny runs --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def micro_bench_cfg():
    return timing.bench_config("micro", threads=1)


def test_tracking_comparison_logs_every_step_to_a_real_store(micro_bench_cfg, mlflow_store, tmp_path):
    row = tracking_cost.bench_tracking(micro_bench_cfg, tmp_path, reps=1, steps=4,
                                       store_uri=os.environ["MLFLOW_TRACKING_URI"])
    d = row.details
    assert d["metrics_logged_for_loss"] == 4  # read back from the SQLite store
    assert d["identical_losses"]  # tracking does not change what is trained
    assert row.status == report.judge(row.value, ">=", 0.97) and row.value > 0
    assert os.environ["MLFLOW_TRACKING_URI"].startswith("sqlite:")


def test_step_comparison_on_micro(micro_bench_cfg, tmp_path):
    row = step.bench_step(micro_bench_cfg, tmp_path, reps=1, steps=5, warm=1)
    d = row.details
    assert d["tokens_per_step"] > 0 and d["trainer_tokens_per_s"] > 0 and d["bare_tokens_per_s"] > 0
    assert row.status == report.judge(row.value, ">=", 0.9)


def test_generation_comparison_on_micro(micro_bench_cfg, tmp_path):
    peer, loop = generation.bench_generation(micro_bench_cfg, tmp_path, reps=1, n=24)
    assert (peer.key, loop.key) == ("generation", "generation_loop")
    for row in (peer, loop):  # both peers produce exactly our token ids
        assert row.details["mismatches"] == 0 and "identical" in row.measured
    assert "HF batched" in peer.compared_with and peer.status == report.judge(peer.value, ">=", 1.0)
    assert loop.value > 1  # batched beats one-at-a-time even at 24 answers
    assert loop.status == report.judge(loop.value, ">=", 10)


def test_hf_batched_generate_equals_ours_on_left_padded_rows_with_several_stop_ids():
    """The peer row is only fair if HF's batched `generate` decodes the same thing: left-padded rows of different
    lengths, two stop ids, cut at the first one."""
    lm = tiny_llama(3)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(6, 7, 32, generator=g)
    mask = torch.ones(6, 7, dtype=torch.long)
    for i, pad in enumerate((0, 2, 0, 3, 1, 0)):
        mask[i, :pad] = 0
    with torch.no_grad():
        free = greedy_generate(lm, emb, mask, 10, []).token_ids
        stops = {pick_eos(free), pick_eos([r[::-1] for r in free[::-1]])}
        ours = greedy_generate(lm, emb, mask, 10, stops).token_ids
        peer = generation.hf_batched_generate(lm, emb, mask, 10, stops, pad_id=0, batch_size=4)
    assert peer == ours
    assert any(len(r) < 10 for r in ours) and any(len(r) == 10 for r in free)  # stops really cut rows


@pytest.mark.slow
def test_compile_row_on_micro(micro_bench_cfg, tmp_path):
    row = step.bench_compile(micro_bench_cfg, tmp_path, reps=1, steps=3, warm=1)
    d = row.details
    assert row.key == "compile" and row.status == report.INFO and row.value > 0
    assert d["first_compiled_pass_s"] > 0 and d["winner"] in row.measured


def test_startup_has_no_heavy_imports():
    assert processes.heavy_imports_at_startup() == []
    row = processes.bench_startup(reps=1)
    assert set(row.details["median_s"]) == {"python -c pass", "latentgate --help", "latentgate config"}
    assert row.status == report.judge(row.value, "<=", 0.5)


def test_measure_subprocess_reports_the_child_peak_rss(tmp_path):
    code = "b = bytearray(150 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); print('done')"
    res = processes.measure_subprocess([sys.executable, "-c", code], log=tmp_path / "child.log")
    assert res["rc"] == 0 and res["output"].strip() == "done"
    assert 150 * 1024**2 <= res["max_rss_bytes"] < 1024**3
    assert (tmp_path / "child.log").read_text().strip() == "done"


def test_smoke_summary_is_parsed_from_the_real_format():
    from latentgate.phases.results import SmokeResult
    from latentgate.phases.smoke import format_summary

    summary = SmokeResult(run_id="0123456789abcdef0123456789abcdef", text_f1=0.9, latent_f1=0.125, latent_em=0.05,
                          stage_a_probe_first_acc=0.2, stage_b_probe_first_acc=None,
                          controls_f1={"zero_latent": 0.0}, wall_seconds=123.4, base_source="reused:x",
                          output_dir="runs/x", tracking_uri="sqlite:////tmp/x/mlflow.db")
    parsed = processes.parse_smoke_summary("noise\n" + format_summary(summary) + "\n")
    assert parsed == {"run_id": summary.run_id, "latent_f1": 0.125, "latent_em": 0.05, "wall_seconds": 123.0,
                      "tracking_uri": "sqlite:////tmp/x/mlflow.db"}


@pytest.mark.slow
def test_smoke_row_on_micro(tmp_path, hf_home):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "HF_HOME": str(hf_home)}
    row = processes.bench_smoke("micro", ["--set", f"run.output_dir={tmp_path / 'runs'}"], tmp_path / "out", env=env)
    d = row.details
    assert d["rc"] == 0, d["output_tail"]
    assert d["latent_f1_source"] == "mlflow" and d["latent_f1"] is not None
    assert 0 < d["max_rss_bytes"] < 4 * 1024**3 and d["wall_s"] > 0
    assert (tmp_path / "out" / "smoke.log").exists()


# ---- GPU rows: the code path runs on CPU with a tiny config --------------------------------------------------

def test_gpu_path_places_everything_on_device_and_dtype(micro_bench_cfg):
    cfg = resolve(None, {**flatten(micro_bench_cfg), "base.dtype": "bfloat16", "data.n_train": 64,
                           "stage_b.batch_size": 4})
    r = gpu.gpu_stage_b(cfg, torch.device("cpu"), steps=3, warm=1, vocab_size=512, gen_n=8)
    assert r["tokens_per_s"] > 0 and r["model_tflops_per_s"] > 0 and r["gen_answers_per_s"] > 0
    assert r["mfu"] is None  # no peak is known for a CPU
    assert r["placement"].get("lm:base:bfloat16", 0) > 0  # the frozen LM really is in bf16
    assert r["placement"].get("lm:lora:float32", 0) + r["placement"].get("lm:lora:bfloat16", 0) > 0


def test_placement_check_catches_a_stray_dtype(micro_bench_cfg):
    cfg = resolve(None, {**flatten(micro_bench_cfg), "base.dtype": "bfloat16", "data.n_train": 16})
    ws = gpu.direct_workspace(cfg, torch.device("cpu"), stage="stage_a")
    gpu.check_placement(ws)
    layer = ws.lm.model.layers[0].mlp.down_proj
    layer.weight.data = layer.weight.data.float()
    with pytest.raises(AssertionError, match="down_proj.weight is torch.float32"):
        gpu.check_placement(ws)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA")
def test_gpu_rows_say_not_measured_without_cuda():
    rows = gpu.bench_gpu()
    assert [r.status for r in rows] == [report.NOT_MEASURED] * 2
    assert all("no GPU" in r.measured for r in rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_rows_on_cuda():
    """On CUDA both rows are measured on the GPU: the bf16 LM with fp32 trainables all on the device, the timed
    steps after warm-up, MFU against the device's peak with the verdict its bar gives, and the generation rate."""
    rows = gpu.bench_gpu({"base.layers": 2, "stage_b.batch_size": 8}, steps=4)
    assert [r.key for r in rows] == ["gpu_step", "gpu_generation"]
    step_row, gen_row = rows
    r = step_row.details
    assert (r["device"], r["dtype"], r["steps"], r["batch_size"]) == ("cuda", "bfloat16", 2, 8)  # 4 steps, 2 warm
    assert r["placement"].get("lm:base:bfloat16", 0) > 0 and r["placement"].get("lm:lora:float32", 0) > 0
    assert all(k.endswith(":float32") for k in r["placement"] if not k.startswith("lm:base:"))  # what trains is fp32
    assert r["tokens_per_s"] > 0 and r["model_tflops_per_s"] > 0 and isinstance(r["host_syncs_per_step"], int)
    peak = gpu.peak_flops(torch.device("cuda"))
    if peak is None:  # a GPU without a known peak: MFU is not claimed
        assert r["mfu"] is None and step_row.value is None and step_row.status == report.NOT_MEASURED
    else:
        assert step_row.value == r["mfu"] == pytest.approx(r["model_tflops_per_s"] * 1e12 / peak)
        assert step_row.status == (report.PASS if r["mfu"] >= 0.40 else report.FAIL)
    assert gen_row.value > 0 and gen_row.status == report.INFO
    assert gen_row.details["max_new_tokens"] == resolve("smoke").eval.max_new_tokens


# ---- the CLI -------------------------------------------------------------------------------------------------

def test_cli_writes_table_and_exit_code_matches(tmp_path):
    from conftest import run_cli

    out = tmp_path / "bo"
    res = run_cli("bench", "--only", "startup", "--reps", "1", "--out", str(out))
    data = json.loads((out / "bench.json").read_text())
    statuses = {r["key"]: r["status"] for r in data["rows"]}
    assert statuses["smoke"] == report.NOT_MEASURED and "startup" in statuses
    assert res.returncode == (0 if statuses["startup"] == report.PASS else 1), res.stderr
    assert "latentgate --help" in res.stdout and (out / "bench.md").exists()
    bad = run_cli("bench", "--only", "nope")
    assert bad.returncode == 2 and "unknown comparison" in bad.stderr


def test_bench_command_offers_exactly_the_comparisons_it_runs():
    from conftest import run_cli
    from latentgate.bench.cli import CHOICES
    from latentgate.bench.runner import KEYS
    from latentgate.cli import main

    assert "bench" in main.commands
    assert set(CHOICES) == set(KEYS)  # every default comparison can be chosen with --only, and nothing else
    help_text = run_cli("bench", "--help").stdout
    assert all(key in help_text for key in KEYS)
